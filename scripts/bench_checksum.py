#!/usr/bin/env python3
"""What the checkpoint checksum costs (fairseq_agg.checkpoints): saving a checkpoint with
fairseq's own ``torch_persistent_save`` against the plug-in's sealed save, and the time a resume
spends verifying the file, beside the time ``torch.load`` takes to read it.

    python scripts/bench_checksum.py                 # a 1 GiB checkpoint, 5 rounds
    python scripts/bench_checksum.py --size-mb 4096 --rounds 3 --dir /scratch

The checkpoint holds --size-mb of float32 weights and fairseq's training record. Times are
medians over the rounds; the files live in a fresh folder under --dir (default: the system's
temporary folder) that is removed at the end.
Right after a save the file is in the page cache, as it is for the verification that follows a
crash-free restart on the same machine; a resume after a reboot reads it from disk, for
verification and for ``torch.load`` alike. Where the disk is slower than the hash, the kernel
writes the file back while the seal is computed: "seal alone" is the CPU time the seal adds.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fairseq_agg import checkpoints  # noqa: E402 - importing the plug-in installs the sealed save

from fairseq import checkpoint_utils  # noqa: E402  (after the plug-in, which quiets its import)


def fairseq_like_checkpoint(size_bytes: int) -> dict:
    tensor_bytes = 64 << 20
    count, rest = divmod(size_bytes, tensor_bytes)
    sizes = [tensor_bytes] * count + ([rest] if rest else [])
    generator = torch.Generator().manual_seed(0)
    model = {f"decoder.layers.{i}.weight": torch.rand(n // 4, generator=generator) for i, n in enumerate(sizes)}
    return {
        "model": model,
        "optimizer_history": [{"criterion_name": "AggCrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {}, "num_updates": 50000}],
        "last_optimizer_state": None,
        "extra_state": {"train_iterator": {"epoch": 3, "iterations_in_epoch": 0}},
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="checkpoint size in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; medians are printed (default 5)")
    parser.add_argument("--dir", type=Path, default=None, help="where the files are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.size_mb <= 0 or args.rounds <= 0:
        parser.error("--size-mb and --rounds must be positive")

    sealed_save = checkpoint_utils.torch_persistent_save
    plain_save = sealed_save.__wrapped__
    state = fairseq_like_checkpoint(args.size_mb << 20)
    workdir = Path(tempfile.mkdtemp(prefix="bench-checksum-", dir=args.dir))
    plain, sealed = str(workdir / "plain.pt"), str(workdir / "sealed.pt")
    times = {"save (fairseq)": [], "save (sealed)": [], "seal alone (hash + comment)": [], "verify": [],
             "update count (for the fallback)": [], "torch.load": []}
    try:
        for round_ in range(args.rounds):
            # Alternated, so that neither save always pays for the other's write-back to disk.
            saves = [("save (fairseq)", plain_save, plain), ("save (sealed)", sealed_save, sealed)]
            for name, save, path in saves if round_ % 2 == 0 else saves[::-1]:
                times[name].append(timed(lambda: save(state, path)))
            times["seal alone (hash + comment)"].append(timed(lambda: checkpoints.seal(plain)))
            outcome = []
            times["verify"].append(timed(lambda: outcome.append(checkpoints.damage(sealed))))
            assert outcome == [None] and checkpoints.seal_matches(sealed), "the sealed file does not verify"
            times["update count (for the fallback)"].append(timed(lambda: checkpoints.training_progress(sealed)))
            times["torch.load"].append(timed(lambda: torch.load(sealed, map_location="cpu", weights_only=False)))
        size = os.path.getsize(sealed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    overhead = median["save (sealed)"] - median["save (fairseq)"]
    print(f"checkpoint of {size / 2**30:.2f} GiB, median of {args.rounds} rounds, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    print("| step | seconds | GiB/s |")
    print("|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.3f} | {size / 2**30 / seconds:.2f} |")
    print(f"save overhead: {overhead:+.3f} s ({overhead / median['save (fairseq)']:+.0%}); "
          f"verify / torch.load: {median['verify'] / median['torch.load']:.2f}")


if __name__ == "__main__":
    main()
