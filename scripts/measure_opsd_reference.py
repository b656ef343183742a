"""Does a model read the reference answer OPSD puts in its teacher's text? Toy-world check.

    PYTHONPATH=src python scripts/measure_opsd_reference.py [--model toy-base] [--n 500]

Greedy accuracy of ``--model`` on the clean full images of the toy world's held-out scenes
(seed 123), once with the plain question (the student's prompt) and once with the OPSD teacher's
text (`vopd.views.reference_text`: the question plus ``Reference answer: ...``). OPSD's signal is
the difference between the two: a model that ignores the answer in its context gives the student
nothing to learn (docs/toyworld.md, ablations, records the toy base's numbers).
"""

from __future__ import annotations

import argparse

import torch

import vopd.toyworld  # noqa: F401  registers the toy-base model spec
from vopd.config import RolloutConfig
from vopd.models import build_prompts
from vopd.rollout import HFGenerateEngine
from vopd.specs import resolve_model_spec
from vopd.toyworld.model import toy_answer_correct
from vopd.toyworld.scenes import HELDOUT_SEED, make_dataset, view_input
from vopd.views import reference_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-base")
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = resolve_model_spec(
        args.model, dtype="float32", trust_remote_code=False, attn_implementation=None, seed=0
    )
    samples = make_dataset(args.n, HELDOUT_SEED)
    engine, greedy = HFGenerateEngine(processor), RolloutConfig(n=1, temperature=0, max_new_tokens=8)
    texts = {
        "question only (student prompt)": lambda s: view_input(s, "full")[1],
        "question + reference answer (OPSD teacher)": lambda s: reference_text(s, hint=False),
    }
    for name, text in texts.items():
        right = 0
        for i in range(0, len(samples), 100):
            batch = samples[i : i + 100]
            prompts = build_prompts(processor, [view_input(s, "full")[0] for s in batch], [text(s) for s in batch])
            ro = engine.sample(model, prompts, greedy)
            right += sum(
                toy_answer_correct(processor.tokenizer.decode(ids[m]), s)
                for s, ids, m in zip(batch, ro.response_ids_B_T, ro.mask_B_T)
            )
        print(f"full image, {name}: {100 * right / len(samples):.1f} % of {len(samples)}")


if __name__ == "__main__":
    main()
