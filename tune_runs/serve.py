"""`darp serve`: live on-the-fly retrieval in the browser, on Ray Serve.

A person draws on the page (policies/running/static/); after every stroke the page sends all strokes so
far and the server answers with the top-10 photos, where the policy looked, and the rank of a target
photo the person picked. The retrieval itself is `policies.darp.rollout.LiveRetrieval` (one level per
new stroke, cached by stroke prefix, so answers depend only on the strokes sent); the web app
(`policies.running.live_app`) parses and checks requests, and `policies.running.live_service` batches
concurrent drawers and deploys the app on Ray Serve.

Under load (`Batcher`, Ray Serve's `@serve.batch`) the requests in flight share batched rounds: one
policy level (rendering, the phase-1 embedding and the G glimpses of every drawer's new partial
sketch in one pass), then one ranking pass for the drawings it finished. A request whose strokes the
replica has not seen (a long drawing sent at once, or a replica that has not seen the earlier
strokes) is replayed one level per round beside everyone else's new strokes, so it costs the others
one row of a batch, not a stall; `--max-strokes` and `--max-points` bound a request (413 beyond).
Each replica keeps its own cache; `--num-replicas` adds replicas where cores allow (a drawer's next
stroke may then reach a replica that replays the earlier ones).

    darp serve --data runs/data/chairv2 --run runs/darp [--port 8000] [--split val]

Endpoints: GET / (the page), GET /photos/{photo_id} (PNG thumbnail), GET /api/gallery (photo and
sketch ids), POST /api/query {"strokes": [[[x, y], ...], ...], "canvas": [w, h], "target": id?} (the answer also
carries the run's calibrated confidence after each stroke and the stroke where it says "you can stop"),
POST /api/replay {"sketch_id": id} (a data-set sketch's strokes, x and y in [0, 1]). Bad requests
get a 4xx with {"error": message}. SIGINT (Ctrl-C) or SIGTERM stops Serve and Ray.

The options are policies.running.live_service.ServeConfig's; the engine is
policies.running.live_service.serve_until_interrupted.
"""

from __future__ import annotations

from policies.running.live_service import ServeConfig, serve_until_interrupted

__all__ = ["ServeConfig", "run"]


def run(cfg: ServeConfig) -> int:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, then shut Serve and Ray down
    (`policies.running.live_service.serve_until_interrupted`)."""
    serve_until_interrupted(cfg)
    return 0
