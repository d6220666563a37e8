"""
devices.py: where a run computes and in what precision: the device (CUDA, then Apple's MPS, then the
CPU), the dtype (bfloat16 wherever the device multiplies it natively), and the processes of a
torchrun launch, one per GPU.

    python gemma.py train --device cpu --dtype float32   # what auto would otherwise choose
"""
import os
import signal

import torch

from cli import UserError


def pick_device(name):
    """auto: CUDA, then Apple's MPS, then the CPU; a device this machine lacks is a UserError."""
    count = dict(cuda=torch.cuda.device_count(), mps=int(torch.backends.mps.is_available()), cpu=1)
    if name == "auto":
        name = next(kind for kind, n in count.items() if n)
    kind, _, index = name.partition(":")
    if kind not in count or index and not (kind == "cuda" and index.isdigit()):
        raise UserError(f"--device must be auto, cpu, cuda, cuda:N or mps, not {name}")
    if int(index or 0) >= count[kind]:
        raise UserError(f"--device {name}: this machine has no such device; use --device cpu "
                        "(or auto)")
    return torch.device(name)


def cpu_has_bfloat16():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), not by conversion."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_dtype(name, device):
    """The dtype a run trains in (under autocast) or a model generates in (its weights). auto:
    bfloat16 wherever the device multiplies it natively: GPUs that have it, and CPUs with
    AVX512-BF16 or AMX, where the small preset's step runs 1.5x faster than in float32 and a 270m
    token decodes 2.1x faster eager, 2.4x compiled (bench.py, an AMD EPYC with AVX512-BF16);
    float16 (with a gradient scaler) on GPUs without it, such as a T4, and on Apple silicon; float32
    on other CPUs, which would convert bfloat16 at every multiply."""
    if name == "auto" and device.type == "cuda":
        name = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    elif name == "auto" and device.type == "cpu" and cpu_has_bfloat16():
        name = "bfloat16"
    elif name == "auto":
        name = "float16" if device.type == "mps" else "float32"
    if name not in ("bfloat16", "float16", "float32"):
        raise UserError(f"--dtype must be auto, bfloat16, float16 or float32, not {name}")
    return getattr(torch, name)


def start_processes(device_name):
    """(rank, world size, device). Under torchrun, one process per GPU, or per CPU worker with
    the gloo backend; rank 0 alone logs, evaluates and saves."""
    device = pick_device(device_name)
    if hasattr(signal, "SIGPIPE"):  # Python's way back (cli.start_command): a closed pipe is
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # an error, never a death between processes
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def parallel(model, device, world):
    """The model as one of `world` processes trains it: itself alone, else wrapped in
    DistributedDataParallel, which averages the gradients across the processes."""
    if world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def stop_processes(world):
    """The end of a torchrun launch: every process leaves its group together."""
    if world > 1:
        torch.distributed.destroy_process_group()
