"""The model: a deterministic simulator of ksmd, THP splits and the zero-page
remap, with each kernel variant as a policy.  No I/O to the kernel."""

from .costs import CostProfile
from .policies import POLICIES, Policy, get_policy
from .run import ModelUnsupported, simulate

__all__ = ["POLICIES", "CostProfile", "ModelUnsupported", "Policy", "get_policy", "simulate"]
