"""Rectified flow: x_t = (1 - t) x0 + t eps, velocity eps - x0; timestep sampling, loss, Euler sampler."""
from .guidance import cat_batches, drop_conditions, null_condition
from .loss import flow_matching_loss
from .paths import interpolate, velocity_target
from .sampler import FlowSampler, guided_velocity, shifted_sigmas
from .timesteps import TimestepSampler

__all__ = [
    "cat_batches", "drop_conditions", "null_condition",
    "flow_matching_loss", "interpolate", "velocity_target", "TimestepSampler", "FlowSampler", "guided_velocity", "shifted_sigmas"]
