"""Benchmark: the packed loader (synth.packed + per-batch augmentation) against the HDF5 loader, same run, same keys.

For one dataset folder (packed first if needed, with ``synth.packed.pack_dataset``, beside the HDF5 frames):

* CPU milliseconds per sample of one process with one thread (what a DataLoader worker spends): HDF5
  (:class:`synth.data.RenderedFrames`: h5py read + per-sample float64 FrameAugment + collate), packed read only,
  and packed read + :class:`synth.batch_augment.BatchAugment` on the CPU (the whole packed path when training on a
  CPU; on a GPU the augmentation runs there instead);
* samples/s through a DataLoader with the engine's StepSampler and collate, for 0, 1 and 2 workers, both paths.

The process keeps freed heap memory as the ``synth`` training commands do (:func:`synth.runtime.keep_freed_memory`).

Run: ``python bench/loader.py --data data/bench [--size 64] [--batch 32]``.
"""

import argparse
import time

import torch

from synth.data import FrameAugment, RenderedFrames, StepSampler, collate_frames
from synth.packed import PackedFrames, pack_dataset
from synth.runtime import keep_freed_memory


def cpu_ms_per_sample(fn, n_samples: int, repeats: int) -> float:
    """Process CPU time per sample of ``fn()`` (which handles ``n_samples``), after one warm-up call."""
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / (repeats * n_samples) * 1e3


def samples_per_second(dataset, *, batch: int, workers: int, n_batches: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate_frames,
                                         sampler=StepSampler(len(dataset), seed=0, batch_size=batch),
                                         num_workers=workers, persistent_workers=workers > 0)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    return n_batches * batch / (time.perf_counter() - start)


def measure(data: str, *, size: int, batch: int, workers: tuple[int, ...] = (0, 1, 2), repeats: int = 5,
            n_batches: int = 10) -> dict:
    """Both loaders' CPU ms per sample and samples/s (keys ``cpu_ms``, ``rate``: path -> value or workers -> value)."""
    for status, message in pack_dataset(data):
        if status == "skipped":
            raise SystemExit(message)
    augment = FrameAugment(size=size)
    hdf5 = RenderedFrames([data], augment=augment, seed=0)
    packed = PackedFrames([data], augment=augment, seed=0)
    keys = [key for key, _ in zip(StepSampler(len(hdf5), seed=0, batch_size=batch), range(batch), strict=False)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        cpu_ms = {
            "hdf5": cpu_ms_per_sample(lambda: collate_frames([hdf5[k] for k in keys]), batch, repeats),
            "packed_read": cpu_ms_per_sample(lambda: packed.read(packed._keys(keys)[0]), batch, repeats),
            "packed": cpu_ms_per_sample(lambda: packed.__getitems__(keys), batch, repeats),
        }
    finally:
        torch.set_num_threads(threads)
    rate = {name: {w: samples_per_second(ds, batch=batch, workers=w, n_batches=n_batches) for w in workers}
            for name, ds in (("hdf5", hdf5), ("packed", packed))}
    return {"cpu_ms": cpu_ms, "rate": rate}


def report(result: dict, step_rate: float | None = None) -> None:
    cpu, rate = result["cpu_ms"], result["rate"]
    print(f"  loader CPU per sample (1 thread): HDF5 {cpu['hdf5']:.2f} ms, packed {cpu['packed']:.3f} ms "
          f"(read {cpu['packed_read']:.3f} ms + batch augmentation on the CPU) = {cpu['hdf5'] / cpu['packed']:.1f}x "
          f"less (target <= 0.5 ms)")
    for name in ("hdf5", "packed"):
        line = ", ".join(f"{w} workers {r:7.0f}/s" for w, r in rate[name].items())
        print(f"  {name:6s} loader samples/s: {line}")
    if step_rate:
        for name in ("hdf5", "packed"):
            line = ", ".join(f"{w} workers {r / step_rate:5.2f}x" for w, r in rate[name].items())
            print(f"  {name:6s} loader / step consumption ({step_rate:.0f} img/s): {line}  (target >= 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dataset folder written by `synth render`")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    keep_freed_memory()  # as every `synth` training command does
    print(f"loader, batch {args.batch} at {args.size}x{args.size}, {args.data}; CPU x{torch.get_num_threads()}")
    report(measure(args.data, size=args.size, batch=args.batch, workers=tuple(args.workers)))


if __name__ == "__main__":
    main()
