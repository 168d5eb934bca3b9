"""The training collator with one image pass vs two, side by side on the same batches.

A training batch needs the prompt's token ids (to find where the answer starts) and the
prompt + answer's. ``StudentCollator`` runs the processor (images and text) for the
prompts, then expands the answers' image placeholders with the processor's own
``replace_image_token`` and runs the tokenizer alone. The ``two passes`` variant forces the
fallback, which runs the processor (images again) for the answers as well: what every
batch cost before. Both variants collate the same batches of the prepared SynthMed's
``train.json`` in alternation, in one process, on one thread, and must give identical
tensors.

Example (after ``medalign prepare data=synthmed``)::

    PYTHONPATH=platform python benchmarks/collate_bench.py --batches 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medalign_platform.core.student import load_student
from medalign_platform.data.collate import StudentCollator
from medalign_platform.data.conversations import load_conversation_dataset
from medalign_platform.synthmed.prepare import prepared_synthmed_record


class TwoPassCollator(StudentCollator):
    """The collator as it was: the processor, images included, for prompts and for answers."""

    def _encode_again(self, encoded, images, prompts, prompt_ids, texts):
        return self._encode(images, texts)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=160)
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = prepared_synthmed_record()
    _, processor = load_student(record["student"])
    data = load_conversation_dataset(f"{record['data']}/train.json", record["data"])
    collators = {"one pass": StudentCollator(processor, max_length=args.max_length),
                 "two passes": TwoPassCollator(processor, max_length=args.max_length)}
    seconds = {name: [] for name in collators}
    for k in range(args.batches):
        items = [data[(k * args.batch_size + i) % len(data)] for i in range(args.batch_size)]
        outputs = {}
        for name, collator in collators.items():
            tick = time.perf_counter()
            outputs[name], _ = collator(items)
            seconds[name].append(time.perf_counter() - tick)
        one, two = outputs["one pass"], outputs["two passes"]
        assert one.keys() == two.keys() and all(torch.equal(one[key], two[key]) for key in one), k
    median = {name: statistics.median(values) * 1000 for name, values in seconds.items()}
    for name, value in median.items():
        print(f"{name:10s}: {value:6.1f} ms per batch of {args.batch_size} (median of {args.batches})")
    print(f"one pass / two passes: {median['one pass'] / median['two passes']:.3f}; identical batches: yes")


if __name__ == "__main__":
    main()
