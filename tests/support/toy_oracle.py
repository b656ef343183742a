"""A scripted writer and filter for ``vopd data build`` on toy-world scenes (served by FakeChatServer).

The writer knows each scene's contents (the records that ``vopd data toyworld`` wrote): it reads
the image's file name from the prompt (the test template holds ``image={image}``), finds the red
box in the second image (the build runs with ``--writer-full-image``) and asks the toy question
about the object inside it, with its true colour among four options. A box around no object gets
a refusal that is not JSON. The filter knows the right option of every question the writer wrote
(it shares the scene's contents) and answers it in a controllable share of its samples, the next
option otherwise: ``agreement(key)`` on a crop, ``full_agreement(key)`` on a full image, where
``key`` is the question, its options and ``|`` between them. A question it does not know gets
rotating letters.
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

from vopd.records import load_records
from vopd.toyworld.scenes import COLOURS, question_text

RED = (255, 0, 0)


def _images(body: dict[str, Any]) -> list[Image.Image]:
    out = []
    for message in body.get("messages", []):
        for part in message.get("content", []) if isinstance(message.get("content"), list) else []:
            if part.get("type") == "image_url":
                data = part["image_url"]["url"].split(",", 1)[1]
                out.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return out


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
    ):
        self.scenes = {Path(str(s.image)).name: s.meta["objects"] for s in load_records(records)}
        self.agreement = agreement
        self.full_agreement = full_agreement
        self.fence = fence
        self.truth: dict[str, str] = {}  # question + options -> the right letter (the writer knows)

    def writer(self, text: str, body: dict[str, Any]) -> str:
        name = re.search(r"image=(\S+)", text).group(1)
        images = _images(body)
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
        self.truth[question + "|" + "|".join(options)] = "ABCD"[slot]
        reply = json.dumps({"question": question, "options": options, "answer": "ABCD"[slot]})
        return f"Here it is:\n```json\n{reply}\n```" if self.fence and rng.random() < 0.5 else reply

    def filter(self, text: str, body: dict[str, Any]) -> list[str]:
        image = _images(body)[0]
        options = re.findall(r"^([A-D])\. (.+)$", text, re.MULTILINE)
        n = int(body.get("n", 1))
        key = text.splitlines()[0] + "|" + "|".join(o for _, o in options)
        right = self.truth.get(key)
        full = image.width >= 168  # toy scenes are 168 px; crops of the default views 112 px
        share = self.full_agreement(key) if full else self.agreement(key)
        if right is None:
            return [f"The answer is {options[i % 4][0]}." for i in range(n)]
        wrong = "ABCD"[("ABCD".index(right) + 1) % 4]
        k = round(share * n)
        return [f"{right}" if i < k else f"Answer: {wrong}" for i in range(n)]
