"""Frames/s of the realistic scene families against the primitive ones, measured in the same run, and worker RSS.

For each resolution, ``--scenes`` scenes of each family are rendered by :func:`render.shard.render_shard` (one
worker, labels, HDF5 and COCO written; process start and BlenderProc init included) and the frames/s of
``tabletop`` / ``room`` are printed as a ratio to ``primitives_tabletop`` / ``primitives_room``. Then the worker's
RSS over ``--rss-frames`` realistic tabletop frames at 64 px (``--views`` per scene) without recycling: the last
sample vs the first after the first frame, and the median of the last tenth of the samples vs the first tenth (a
sample depends on the textures of the scene rendered at that instant; see ``RssSampler.summary`` in
``bench/render_worker.py``).

Run::

    .venv/bin/python bench/realistic_scenes.py --resolution 64 128 --scenes 4 --rss-frames 300
    .venv/bin/python bench/realistic_scenes.py --resolution --views 8 --rss-frames 1000   # RSS only
"""

import argparse
import sys
import tempfile
from pathlib import Path

# bench/render_worker.py (run from this folder)
from render_worker import NO_RECYCLING, RssSampler, format_rss, run_ours


def samplers(views: int) -> dict:
    from synth.realistic import FurnishedRoomScene, ScannedTabletopScene
    from synth.sampling import RoomScene, TabletopScene

    return {"primitives_tabletop": TabletopScene(views=views), "tabletop": ScannedTabletopScene(views=views),
            "primitives_room": RoomScene(views=views), "room": FurnishedRoomScene(views=views)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, nargs="*", default=[64, 128],
                        help="none (a bare --resolution) runs only the RSS measurement")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--rss-frames", type=int, default=300, help="0 skips the RSS run")
    args = parser.parse_args(argv)
    pool = samplers(args.views)
    with tempfile.TemporaryDirectory(prefix="bench-realistic-") as tmp:
        root = Path(tmp)
        for resolution in args.resolution:
            fps = {}
            for name, sampler in pool.items():
                timed = run_ours(sampler, root / f"{name}_{resolution}", resolution=resolution, scenes=args.scenes,
                                 recycle_every=NO_RECYCLING)
                fps[name] = args.scenes * args.views / timed.wall
            print(f"{resolution}px frames/s: " + "  ".join(f"{k} {v:.2f}" for k, v in fps.items()))
            tabletop, room = fps["tabletop"] / fps["primitives_tabletop"], fps["room"] / fps["primitives_room"]
            print(f"{resolution}px ratio: tabletop/primitives_tabletop {tabletop:.2f}  room/primitives_room {room:.2f}",
                  flush=True)
        if args.rss_frames:
            sampler = pool["tabletop"]
            scenes = -(-args.rss_frames // args.views)
            out = root / "rss"
            with RssSampler(out / "shard_00000" / "frames") as rss:
                timed = run_ours(sampler, out, resolution=64, scenes=scenes, recycle_every=NO_RECYCLING)
            print(f"worker RSS over {scenes * args.views} realistic tabletop frames at 64px ({timed.wall:.0f} s, no "
                  f"recycling): {format_rss(rss.summary())}  (target: the median within 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
