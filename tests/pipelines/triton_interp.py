"""Run the Triton photometric kernels under Triton's interpreter on the CPU: `python triton_interp.py CASES OUT`.

TRITON_INTERPRET must be set before triton is imported (and before the kernels are defined), so the tests call this
script in a fresh process. CASES (torch.save'd dict) holds per case either `photometric` arguments or an engine
call (spec, images, seed, output options); OUT receives the outputs under the same names.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from pipelines.augment.engine import _COLS, MultiCropAugment  # noqa: E402
from pipelines.augment.kernels import photometric  # noqa: E402


def run(case: dict):
    if case["kind"] == "photometric":
        return photometric(case["x"], case["p"], case["group"], _COLS, case["mean"], case["std"], case["out_dtype"],
                           case["channels_last"], case["tmp_dtype"])
    aug = MultiCropAugment(case["spec"], out_dtype=case["out_dtype"], channels_last=case["channels_last"],
                           compile=False, work_dtype=case["tmp_dtype"], use_triton=True)
    return aug(case["images"], torch.Generator().manual_seed(case["seed"]))


if __name__ == "__main__":
    cases = torch.load(sys.argv[1], weights_only=False)
    torch.save({name: run(c) for name, c in cases.items()}, sys.argv[2])
