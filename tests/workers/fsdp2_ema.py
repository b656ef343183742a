"""Run under torchrun (2 gloo processes): the sharded EMA teacher against the unsharded reference.

Both start from the same tiny model; the student is perturbed three times (a stand-in for
optimiser steps) and each teacher takes its EMA update; rank 0 compares the gathered sharded
teacher (weights and fp32 masters) with `vopd.teacher.CopyTeacher` and writes the max difference.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from vopd.parallel import build_sharded, exit_rank
from vopd.scoring import ResponseHidden
from vopd.teacher import make_teacher
from vopd.tiny_models import build_tiny_model


def main(out: str, dtype_name: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    dtype = None if dtype_name == "float32" else getattr(torch, dtype_name)
    ref_student, _ = build_tiny_model("qwen2_vl", seed=0)
    reference = make_teacher("ema", ref_student, ema_rate=0.3, dtype=dtype)
    policy, _ = build_tiny_model("qwen2_vl", seed=0)
    sharded = build_sharded(
        ResponseHidden(policy),
        policy,
        teacher_kind="ema",
        rate=0.3,
        teacher_dtype=dtype,
        param_dtype=None,
        device=torch.device("cpu"),
    )
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for (_, p_ref), (_, p) in zip(ref_student.named_parameters(), policy.named_parameters()):
                delta = torch.randn(p_ref.shape, generator=gen) * 1e-2
                p_ref.add_(delta)
                local = p.to_local()  # this rank's rows of the same perturbation
                rows = local.shape[0]
                start = dist.get_rank() * ((p_ref.shape[0] + 1) // 2)
                local.add_(delta[start : start + rows])
        reference.update(ref_student)
        sharded.update(policy)
    full = sharded.state_dict()  # collective
    if dist.get_rank() == 0:
        ref = reference.state_dict()
        diff = max(float((full[k] - ref[k]).abs().max()) for k in ref)
        moved = max(
            float((ref[k] - p.detach()).abs().max())
            for k, p in build_tiny_model("qwen2_vl", seed=0)[0].state_dict().items()
        )
        shards = [tuple(p.to_local().shape) != tuple(p.shape) for p in sharded.model.parameters()]
        json.dump(
            {
                "max_diff": diff,
                "moved": moved,
                "keys_equal": sorted(full) == sorted(ref),
                "dtypes": sorted({str(v.dtype) for v in full.values()}),
                "any_sharded": any(shards),
            },
            open(out, "w"),
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_rank(0)  # as a vopd.cli rank: no interpreter teardown, which can abort a finished rank
