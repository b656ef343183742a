"""A scripted writer and filter for ``vopd data build`` on toy-world scenes (served by FakeChatServer).

The writer knows each scene's contents (the records that ``vopd data toyworld`` wrote): it reads
the image's file name from the prompt (the test template holds ``image={image}``), finds the red
box in the second image (the build runs with ``--writer-full-image``) and asks the toy question
about the object inside it, with its true colour among four options. A box around no object gets
a refusal that is not JSON. The filter knows the right option of every question the writer wrote
(it shares the scene's contents) and answers it in a controllable share of its samples, the next
option otherwise: ``agreement(key)`` on a crop, ``full_agreement(key)`` on a full image, where
``key`` joins the question, its options and a hash of the image shown with ``|``. With ``p_right`` each crop sample
is instead right with that probability (seeded by the key: a noisy reader, for benchmarks). A
question it does not know gets rotating letters.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vopd.evaluation.backends import image_data_url
from vopd.images import load_image
from vopd.records import load_records
from vopd.toyworld.scenes import COLOURS, question_text

RED = (255, 0, 0)


def _urls(body: dict[str, Any]) -> list[str]:
    out = []
    for message in body.get("messages", []):
        for part in message.get("content", []) if isinstance(message.get("content"), list) else []:
            if part.get("type") == "image_url":
                out.append(part["image_url"]["url"])
    return out


def _decode(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def _key(question: str, options: list[str], image_url: str) -> str:
    """What identifies a question for the filter: its text, options and the image it is asked on."""
    return "|".join([question, *options, hashlib.sha256(image_url.encode()).hexdigest()[:12]])


def _h(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


class ToyOracle:
    """Writer and filter responders for FakeChatServer, from the toy records at ``records``."""

    def __init__(
        self,
        records: str | Path,
        *,
        agreement: Callable[[str], float] = lambda key: 1.0,
        full_agreement: Callable[[str], float] = lambda key: 0.0,
        fence: bool = True,
        p_right: float | None = None,
    ):
        samples = load_records(records).samples
        self.scenes = {Path(str(s.image)).name: s.meta["objects"] for s in samples}
        self.paths = {Path(str(s.image)).name: s.image for s in samples}
        self.agreement = agreement
        self.full_agreement = full_agreement
        self.fence = fence
        self.p_right = p_right
        self.truth: dict[str, str] = {}  # question + options -> the right letter (the writer knows)

    def writer(self, text: str, body: dict[str, Any]) -> str:
        name = re.search(r"image=(\S+)", text).group(1)
        urls = _urls(body)
        images = [_decode(u) for u in urls]
        arr = np.asarray(images[-1])
        ys, xs = np.nonzero(np.all(arr == RED, axis=-1))
        if len(images) < 2 or not len(xs):
            return "I cannot tell which region you mean."
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max(), ys.max()
        inside = [
            o
            for o in self.scenes[name]
            if x1 < (o["box"][0] + o["box"][2]) / 2 < x2 and y1 < (o["box"][1] + o["box"][3]) / 2 < y2
        ]
        if not inside:
            return "There is no object in the red box."
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        obj = min(
            inside, key=lambda o: abs((o["box"][0] + o["box"][2]) / 2 - cx) + abs((o["box"][1] + o["box"][3]) / 2 - cy)
        )
        rng = random.Random(_h(name + str(obj["box"])))
        others = rng.sample([c for c in COLOURS if c != obj["colour"]], 3)
        slot = rng.randrange(4)
        options = others[:slot] + [obj["colour"]] + others[slot:]
        question = question_text(obj["shape"])
        # The filter sees the same crop (the first image here), or the clean full image (--drop-easy).
        full = image_data_url(load_image(self.paths[name]))
        for url in (urls[0], full):
            self.truth[_key(question, options, url)] = "ABCD"[slot]
        reply = json.dumps({"question": question, "options": options, "answer": "ABCD"[slot]})
        return f"Here it is:\n```json\n{reply}\n```" if self.fence and rng.random() < 0.5 else reply

    def filter(self, text: str, body: dict[str, Any]) -> list[str]:
        url = _urls(body)[0]
        image = _decode(url)
        options = re.findall(r"^([A-D])\. (.+)$", text, re.MULTILINE)
        n = int(body.get("n", 1))
        key = _key(text.splitlines()[0], [o for _, o in options], url)
        right = self.truth.get(key)
        full = image.width >= 168  # toy scenes are 168 px; crops of the default views 112 px
        share = self.full_agreement(key) if full else self.agreement(key)
        if right is None:
            return [f"The answer is {options[i % 4][0]}." for i in range(n)]
        wrong = "ABCD"[("ABCD".index(right) + 1) % 4]
        if self.p_right is not None and not full:  # a noisy reader: each sample right with p_right
            rng = random.Random(_h(key))
            return [f"{right}" if rng.random() < self.p_right else f"Answer: {wrong}" for _ in range(n)]
        k = round(share * n)
        return [f"{right}" if i < k else f"Answer: {wrong}" for i in range(n)]
