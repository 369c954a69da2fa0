"""Calibration profiles: measure each attention site, choose its method under a quality budget,
save / load / inspect / plot the result (``calibrate``, ``Budget``, ``Profile``, ``load_profile``)."""
from .budget import Budget
from .calibrate import calibrate, calibrate_sites
from .profile import PROFILE_FORMAT, Profile, apply_profile, load_profile

__all__ = ["Budget", "Profile", "PROFILE_FORMAT", "calibrate", "calibrate_sites", "load_profile", "apply_profile"]
