"""Graph passes: capture (model -> FX graphs), detect (graphs -> attention sites), grid inference,
normalisation of hand-written attention, and the rewrite that routes sites to our ops."""
