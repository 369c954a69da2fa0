"""Graph passes: capture (model -> FX graphs), detect (graphs -> attention sites), grid inference,
normalisation of hand-written attention, text padding masks, plans at other video sizes. The router
(``router.py``) then sends the sites to our ops."""
