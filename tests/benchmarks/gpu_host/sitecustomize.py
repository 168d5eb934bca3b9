"""Hides the packages the GPU host does not have (tests/benchmarks/test_gpu_check.py).

Put this folder first on PYTHONPATH: Python imports ``sitecustomize`` at start-up, and from
then on the path finder reports these top-level packages as absent, exactly as on a host
where they were never installed (``import ray`` raises ModuleNotFoundError).
"""

import importlib.machinery
import sys

ABSENT = frozenset({"open_clip", "ftfy", "hydra", "omegaconf", "ray", "optuna", "sacrebleu", "rouge_score"})


class _PathFinderWithout(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.partition(".")[0] in ABSENT:
            return None
        return super().find_spec(fullname, path, target)


sys.meta_path[:] = [_PathFinderWithout if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
