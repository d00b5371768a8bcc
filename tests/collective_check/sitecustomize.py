"""Put on PYTHONPATH by the two-process tests: every torch.distributed.all_reduce of the run is checked
and recorded. A tensor that is not on this process's training device is refused, as NCCL refuses CPU
tensors on a GPU machine (there the device is cuda:LOCAL_RANK; on these CPU machines, cpu). Each call
is appended to $TUNER_COLLECTIVE_LOG.RANK, so a test can count them per step. Every safetensors file the
process opens is appended to $TUNER_COLLECTIVE_LOG.RANK.reads (which processes read the weights)."""

import os

if os.environ.get("TUNER_COLLECTIVE_LOG") and "LOCAL_RANK" in os.environ:
    import torch
    import torch.distributed as dist

    _all_reduce = dist.all_reduce

    def _checked_all_reduce(tensor, *args, **kwargs):
        device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if torch.cuda.is_available() else torch.device("cpu")
        with open(f"{os.environ['TUNER_COLLECTIVE_LOG']}.{os.environ.get('RANK', '0')}", "a") as log:
            log.write(f"{tensor.device} {tensor.dtype} {tensor.numel()}\n")
        if tensor.device != device:
            raise RuntimeError(f"all_reduce of a tensor on {tensor.device}, not on the training device {device} "
                               "(NCCL has no CPU collectives)")
        return _all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = _checked_all_reduce

    import safetensors

    _safe_open = safetensors.safe_open

    def _logged_safe_open(filename, *args, **kwargs):
        with open(f"{os.environ['TUNER_COLLECTIVE_LOG']}.{os.environ.get('RANK', '0')}.reads", "a") as log:
            log.write(f"{filename}\n")
        return _safe_open(filename, *args, **kwargs)

    safetensors.safe_open = _logged_safe_open
