"""Which GPU the launchers plan their tiles for."""

# (arch, SM count) that launchers plan for when handed ``meta`` tensors: set only by
# ``bpo_fast.tools.gpu_check``, which records the launches for a GPU it does not have.
_PLAN_TARGET = None


def gpu_target(device):
    """``(arch, sm_count)`` of the GPU a launch on ``device`` runs on (arch as 80, 90, ...), or
    ``None`` for the CPU interpreter. The launchers pick their tiles from it."""
    if device.type == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        return props.major * 10 + props.minor, props.multi_processor_count
    if device.type == "meta" and _PLAN_TARGET is not None:
        return _PLAN_TARGET
    return None
