"""How the model is spread over processes, and how its state is saved and restored whatever the
spread: one object per way of running (Single, DDP, FSDP2, DeepSpeed ZeRO), which the loop asks and
never names.

Checkpoints always hold full (unsharded) tensors, so a checkpoint written by 2 FSDP
processes resumes in 1 process and converts with `tuner convert pth_to_hf` like any other.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from tuner.config import Config
from tuner.engine import zero
from tuner.errors import TunerError
from tuner.model.load import load_model


def shard(raw_model, device: torch.device | None, from_rank0: bool):
    """FSDP2: the model sharded in place, one group per transformer block and one for the rest; returns
    the module the loop calls. State dicts and generation keep using `raw_model`.

    `from_rank0`: rank 0 holds the loaded weights on CPU and the other ranks only the structure on the
    meta device, so no device and no other process ever holds the whole model. Each group is moved to
    the device shard by shard as it is sharded; the other ranks then get their shards from rank 0's full
    tensors (one broadcast per tensor), and the buffers a state dict leaves out (rotary frequencies)."""
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(_base(raw_model), "_no_split_modules", None) or [])
    blocks = [m for m in raw_model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise TunerError(f"FSDP: cannot find the transformer blocks of {type(_base(raw_model)).__name__}")
    rank0 = torch.distributed.get_rank() == 0
    state = raw_model.state_dict() if from_rank0 else {}  # rank 0: CPU tensors, referenced, not copied
    full, persistent = (state if rank0 else {}), set(state)
    del state
    for block in blocks:  # one all-gather per block: only one block's full weights exist at a time
        fully_shard(block)
    # The root group goes on the transformers model itself, not on a PEFT wrapper: PEFT calls
    # the inner model's forward() directly, which would skip FSDP's hooks. LoRA layers live
    # inside the inner model, so calling it trains the adapters all the same.
    inner = _base(raw_model)
    fully_shard(inner)
    if from_rank0:
        if not rank0:
            raw_model.to_empty(device=device)  # this rank's shards and buffers, not yet filled
        set_model_state_dict(raw_model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for name, buffer in raw_model.named_buffers():
            if name not in persistent:
                torch.distributed.broadcast(buffer, src=0)
        del full
    return inner


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _saved_key_map(raw_model) -> dict[str, str]:
    """{parameter name in the model: key in the checkpoint} - PEFT's adapter key names for LoRA.
    Worked out once per model with one call into PEFT (names do not change while training)."""
    cached = getattr(raw_model, "_tuner_saved_keys", None)
    if cached is not None:
        return cached
    names = [n for n, p in raw_model.named_parameters() if p.requires_grad]
    if not hasattr(raw_model, "peft_config"):
        return {n: n for n in names}
    from peft import get_peft_model_state_dict

    # A distinct placeholder per name: PEFT renames the keys and keeps the values, so each saved key is
    # traced back to its parameter by the placeholder it holds.
    placeholders = {name: torch.empty(0) for name in names}
    by_placeholder = {id(t): name for name, t in placeholders.items()}
    mapping = {name: name for name in names}  # trainable weights PEFT does not know (LLaVA's projector)
    for key, value in get_peft_model_state_dict(raw_model, state_dict=placeholders).items():
        if id(value) in by_placeholder:
            mapping[by_placeholder[id(value)]] = key
    raw_model._tuner_saved_keys = mapping
    return mapping


def model_state_from(raw_model, parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys for full tensors already gathered by name (DeepSpeed ZeRO)."""
    if not hasattr(raw_model, "peft_config"):
        return parameters
    mapping = _saved_key_map(raw_model)
    return {mapping[k]: v for k, v in parameters.items() if k in mapping}


def model_state(raw_model, sharded: bool) -> dict[str, torch.Tensor]:
    """Full tensors of what training changes (adapters for LoRA, all weights for full), on CPU.
    Collective under FSDP: every process calls it; the tensors are only filled on rank 0."""
    lora = hasattr(raw_model, "peft_config")
    trainable_only = lora or getattr(raw_model, "save_trainable_only", False)
    if sharded:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        state = get_model_state_dict(raw_model, options=options)
    elif trainable_only:  # read the parameters directly: quantized layers carry state-dict extras DCP cannot name
        state = {n: p.detach().cpu() for n, p in raw_model.named_parameters() if p.requires_grad}
    else:
        state = raw_model.state_dict()
    # Copied to CPU tensor by tensor: a full fine-tune never holds a second copy of its weights on the GPU.
    if not lora:
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    mapping = _saved_key_map(raw_model)
    return {mapping[k]: v.detach().to("cpu", copy=True) for k, v in state.items() if k in mapping}


def load_model_state(raw_model, saved: dict[str, torch.Tensor], sharded: bool) -> None:
    mapping = {v: k for k, v in _saved_key_map(raw_model).items()}
    unknown = [k for k in saved if k not in mapping and hasattr(raw_model, "peft_config")]
    if unknown:
        raise TunerError(f"the checkpoint holds weights this model lacks: {unknown[:3]}")
    state = {mapping.get(k, k): v for k, v in saved.items()}
    if sharded:
        set_model_state_dict(raw_model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        result = raw_model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise TunerError(f"the checkpoint holds weights this model lacks: {result.unexpected_keys[:3]}")


def optimizer_state(raw_model, optimizer) -> dict:
    return get_optimizer_state_dict(raw_model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(raw_model, optimizer, state: dict) -> None:
    set_optimizer_state_dict(raw_model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------- the strategies the loop runs with

def refuse_sharded_quantization(cfg: Config, flag: str) -> None:
    """QLoRA's 4/8-bit weights are bitsandbytes tensors whose quantization state FSDP and ZeRO-3 do not
    shard with them (FSDP-QLoRA needs the storage in the compute dtype and is untested here): refused."""
    if cfg.model.quantization is not None:
        raise TunerError(f"model.quantization={cfg.model.quantization!r} (QLoRA) with {flag}: the quantized weights "
                         "cannot be sharded (their quantization state is not split with them)",
                         hint="train QLoRA on one process, under DDP (several processes, no flag) or with "
                              "--deepspeed deepspeed_zero2; or LoRA without quantization under --fsdp / ZeRO-3")


class Single:
    """One process: the model as it is. DDP and FSDP2 change only wrapping, syncing and state."""
    name = "single"
    plain_modules = True
    """tuner's fused LoRA / SwiGLU kernels and the chunked head need the modules unwrapped (FSDP and
    DeepSpeed gather and free weights around forward and backward: they keep peft's path)"""
    sharded_state = False

    def configure(self, cfg: Config, compute_dtype: torch.dtype, info) -> None:
        """Settings taken from the run's config, before anything is built (DeepSpeed's JSON)."""

    def load_model(self, cfg: Config, device, dist, info) -> tuple[object, bool]:
        """(the base model, whether it was built already sharded)."""
        return load_model(cfg.model, device, head=cfg.head), False

    def wrap(self, raw_model, device, built_sharded: bool):
        """The module the loop calls (a wrapper, or the model itself); the rest keeps using `raw_model`."""
        return raw_model

    def with_optimizer(self, raw_model, optimizer, model):
        """The module the loop calls once the optimizer exists (DeepSpeed builds its engine here)."""
        return model

    def sharded(self, model) -> bool:
        """Whether generating needs every process (the weights are spread over them)."""
        return self.sharded_state

    def grad_scaler(self, device: torch.device, compute_dtype: torch.dtype):
        """Loss scaling for fp16 (its small gradients underflow without it); a no-op scaler otherwise."""
        return torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)

    def micro_batch(self, model, last: bool):
        """Around one micro-batch's forward and backward: gradients are exchanged on the last one only."""
        return contextlib.nullcontext()

    def backward(self, model, loss: torch.Tensor, scaler) -> None:
        scaler.scale(loss).backward()  # fp16: scaled so small gradients do not underflow

    def gradient_norm(self, model, raw_model, optimizer, scaler, max_norm: float | None) -> float:
        """Clip to `max_norm` and return the norm before clipping (of the true, unscaled gradients)."""
        scaler.unscale_(optimizer)
        params = [p for p in raw_model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a sharded DTensor

    def update(self, optimizer, scaler) -> None:
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def checkpoint_state(self, raw_model, model, optimizer, folder: Path, step: int, lora: bool) -> tuple[dict, dict | None]:
        """(model state, optimizer state) for iter_N.pth: full tensors on CPU. Collective: every process calls it."""
        return model_state(raw_model, sharded=self.sharded_state), optimizer_state(raw_model, optimizer)

    def load_checkpoint_state(self, raw_model, model, optimizer, state: dict, path: Path) -> None:
        if state["optimizer"] is None:
            raise TunerError(f"{path} was written by DeepSpeed: resume it with --deepspeed")
        load_model_state(raw_model, state["model"], sharded=self.sharded_state)
        load_optimizer_state(raw_model, optimizer, state["optimizer"])


class DDP(Single):
    name = "ddp"

    def wrap(self, raw_model, device, built_sharded: bool):
        """DDP, with rank 0's trained parameters sent to the others one tensor at a time. The frozen ones (a
        LoRA run's base) every process read from the same files: DDP's own start-up sync would send them all
        too, through 250 MB buckets it copies them into (on a CPU, 1 GiB more peak memory per process for a
        320 MB model: tools/bench_seqpar.py's)."""
        with torch.no_grad():
            for p in raw_model.parameters():
                if p.requires_grad:
                    torch.distributed.broadcast(p.data, src=0)
        return torch.nn.parallel.DistributedDataParallel(raw_model, init_sync=False)

    def micro_batch(self, model, last: bool):
        return contextlib.nullcontext() if last else model.no_sync()


class FSDP(Single):
    """FSDP2: rank 0 reads the weights on CPU, the other ranks build the structure on the meta device and
    get their shards from rank 0 (shard() above), so no process or device holds the whole model."""
    name = "fsdp"
    plain_modules = False
    sharded_state = True

    def configure(self, cfg: Config, compute_dtype: torch.dtype, info) -> None:
        refuse_sharded_quantization(cfg, "--fsdp")

    def load_model(self, cfg: Config, device, dist, info) -> tuple[object, bool]:
        info(f"Model: weights read by rank 0 only, the other {dist.world_size - 1} build it on the "
             "meta device; FSDP hands out the shards")
        return load_model(cfg.model, "cpu", meta=not dist.is_main, head=cfg.head), True

    def wrap(self, raw_model, device, built_sharded: bool):
        return shard(raw_model, device, from_rank0=built_sharded)

    def grad_scaler(self, device: torch.device, compute_dtype: torch.dtype):
        if compute_dtype != torch.float16:
            return torch.amp.GradScaler(device.type, enabled=False)
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)  # the shards agree on overflow across processes

    @contextlib.contextmanager
    def micro_batch(self, model, last: bool):
        if last:
            yield
            return
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


class DeepSpeed(Single):
    """DeepSpeed ZeRO 1-3: its engine syncs, clips and steps (skipping a non-finite gradient itself);
    ZeRO-3 builds the model partitioned (deepspeed.zero.Init) and loads each weight into its partitions."""
    name = "deepspeed"
    plain_modules = False

    def __init__(self, source: str):
        self.source = source  # a preset name or a JSON file
        self.config: dict | None = None

    def configure(self, cfg: Config, compute_dtype: torch.dtype, info) -> None:
        if compute_dtype == torch.float16:
            raise TunerError("fp16 under --deepspeed: tuner keeps float32 master weights and computes in autocast, "
                             "and DeepSpeed's engine has no loss scale for that, so small fp16 gradients would "
                             "underflow unseen",
                             hint="set train.dtype='bf16' where the GPU has it (Ampere and newer), or train fp16 "
                                  "without --deepspeed (one process, DDP or --fsdp scale the loss with a GradScaler), "
                                  "or set train.dtype='fp32'")
        self.config = zero.ds_config(self.source, cfg, compute_dtype, info)
        if zero.stage(self.config) == 3:
            refuse_sharded_quantization(cfg, f"--deepspeed {self.source} (ZeRO-3)")

    def load_model(self, cfg: Config, device, dist, info) -> tuple[object, bool]:
        if cfg.model.quantization is not None or zero.stage(self.config) != 3:
            return super().load_model(cfg, device, dist, info)
        # a full fine-tune loads float32 there, as the master weights must be (a cast would miss the partitions)
        with zero.partitioned_construction(self.config):
            model = load_model(cfg.model, "cpu", dtype=torch.float32 if cfg.lora is None else None, head=cfg.head)
        info(f"Model: built partitioned over {dist.world_size} processes (ZeRO-3)")
        return model, True

    def with_optimizer(self, raw_model, optimizer, model):
        return zero.initialize(raw_model, optimizer, self.config)  # the engine wraps the model with its optimizer

    def sharded(self, model) -> bool:
        return zero.is_stage3(model)

    def grad_scaler(self, device: torch.device, compute_dtype: torch.dtype):
        return torch.amp.GradScaler(device.type, enabled=False)  # float32 weights, DeepSpeed's own checks

    @contextlib.contextmanager
    def micro_batch(self, model, last: bool):
        # A step may hold fewer micro-batches than gradient_accumulation_steps (the end of an epoch):
        # say where the step ends instead of letting DeepSpeed count.
        model.set_gradient_accumulation_boundary(last)
        yield

    def backward(self, model, loss: torch.Tensor, scaler) -> None:
        model.backward(loss, scale_wrt_gas=False)
        model.step()  # DeepSpeed syncs, clips and steps at the boundary; a no-op before it

    def gradient_norm(self, model, raw_model, optimizer, scaler, max_norm: float | None) -> float:
        return float(model.get_global_grad_norm() or 0.0)  # ZeRO has clipped and stepped already

    def update(self, optimizer, scaler) -> None:
        pass  # ZeRO has stepped already, skipping a non-finite gradient itself

    def checkpoint_state(self, raw_model, model, optimizer, folder: Path, step: int, lora: bool) -> tuple[dict, None]:
        # ZeRO-partitioned optimizer states: DeepSpeed saves them, beside iter_N.pth
        model.save_checkpoint(str(folder / f"iter_{step}_deepspeed"), tag="state")
        weights = zero.full_parameters(raw_model, trainable_only=lora)
        return model_state_from(raw_model, weights), None

    def load_checkpoint_state(self, raw_model, model, optimizer, state: dict, path: Path) -> None:
        folder = path.with_name(path.stem + "_deepspeed")
        if not folder.is_dir():
            raise TunerError(f"{folder} is missing: a DeepSpeed run resumes from a DeepSpeed checkpoint")
        zero.load_weights_only(model)
        model.load_checkpoint(str(folder), tag="state", load_module_strict=False, load_lr_scheduler_states=False)


def choose(distributed: bool, fsdp: bool, deepspeed: str | None) -> Single:
    """The strategy for `tuner train [--fsdp | --deepspeed PRESET]` in one or several processes."""
    if deepspeed:
        return DeepSpeed(deepspeed)
    if not distributed:
        return Single()
    return FSDP() if fsdp else DDP()
