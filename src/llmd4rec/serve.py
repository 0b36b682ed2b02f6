"""Top-K recommendations from a bundle (see export.py), over HTTP or from the shell.

Every answer is the trained model's ranking: `score_all` of the left-padded history, padding column 0 and (by
default) the history's items masked, then `torch.topk`. Client mistakes are 4xx with a one-line
`detail`, never 500: malformed JSON 400, a body over the size limit 413, anything else about the request 422.

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request, imported
inside create_app so that the shell command needs no web stack) as live objects.
"""

import asyncio
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data.dataset import pad_left
from .errors import InputError
from .export import BUNDLE_FILES
from .io import check_finite, load_tensors, read_json, sha256_file

MAX_BODY_BYTES = 1 << 20
MAX_BATCH = 256  # requests per /recommend/batch call: bounds the memory and time of one pass
EMPTY_HISTORY = ("error", "popular")


@dataclass
class Bundle:
    path: Path
    info: dict[str, Any]
    model: Any
    ids: list[str]  # ids[i] = original id of internal id i (ids[0] is padding)
    titles: list[str | None]
    popularity: torch.Tensor  # [n_items + 1] interaction counts


def _load_model(path: Path, info: dict[str, Any]):
    """SASRec needs only torch; the LLM path imports transformers, and only when the bundle is an LLM one."""
    from .config import load_config
    from .loading import build_llm, crm_from_weights

    cfg = load_config(path / "config.yaml", saved=True)
    weights = load_tensors(path / "model.safetensors", expected_sha256=info["files"]["model.safetensors"])
    check_finite(weights, path / "model.safetensors")
    if info["kind"] == "crm":
        model = crm_from_weights(cfg, info["n_items"], weights, path / "model.safetensors")
    else:
        from .models.backbone import load_backbone

        ref = info["backbone"]
        backbone, tokenizer = load_backbone(ref["name"], ref["keep_layers"], ref["dtype"], cfg.llm.attention)
        if "item_table" not in weights:
            raise InputError("LLM bundle weights lack the item table", path / "model.safetensors")
        model = build_llm(cfg, weights.pop("item_table"), "cpu", weights.pop("text_table", None), backbone, tokenizer)
        model.load_trainable_state_dict(weights)
    if model.n_items != info["n_items"] or model.max_len != info["max_len"]:
        raise InputError("model does not match bundle.json (n_items or max_len)", path)
    return model.eval()


def _bundle_info(path: Path) -> dict[str, Any]:
    """bundle.json, checked field by field: a hand-edited or foreign file is one line naming what is wrong."""
    file = path / "bundle.json"
    info = read_json(file)
    if not isinstance(info, dict):
        raise InputError("bundle.json must hold a JSON object", file)
    if info.get("kind") not in ("crm", "llm"):
        raise InputError(f"unknown bundle kind {info.get('kind')!r} (crm or llm)", file)
    for key in ("n_items", "max_len"):
        if type(info.get(key)) is not int or info[key] < 1:
            raise InputError(f"'{key}' must be a positive integer, got {info.get(key)!r}", file)
    for key in ("dataset", "version"):
        if not isinstance(info.get(key), str):
            raise InputError(f"'{key}' must be a string, got {info.get(key)!r}", file)
    if info["kind"] == "llm" and not (isinstance(info.get("backbone"), dict)
                                      and {"name", "keep_layers", "dtype"} <= set(info["backbone"])):
        raise InputError("an LLM bundle needs 'backbone' with name, keep_layers and dtype", file)
    files = info.get("files")
    if not isinstance(files, dict) or any(not isinstance(files.get(f), str) for f in BUNDLE_FILES):
        raise InputError(f"no sha256 recorded for {', '.join(BUNDLE_FILES)} in 'files': an unverifiable bundle "
                         "(export it again with this version)", file)
    for name in BUNDLE_FILES[2:]:  # the tensor files are checked as they are loaded
        if not (path / name).is_file() or sha256_file(path / name) != files[name]:
            raise InputError("missing, or checksum mismatch: the bundle is incomplete or corrupt", path / name)
    return info


def load_bundle(path: str | Path) -> Bundle:
    path = Path(path)
    if not (path / "bundle.json").is_file():
        raise InputError("not a bundle (no bundle.json); make one with `llmd4rec export`", path)
    info = _bundle_info(path)
    n = info["n_items"]
    items = read_json(path / "items.json")
    if not isinstance(items, list) or not all(isinstance(r, dict) and isinstance(r.get("item"), (str, int))
                                              and isinstance(r.get("title", ""), (str, type(None))) for r in items):
        raise InputError('items.json must be a list of {"id", "item", "title"} objects', path / "items.json")
    if [r.get("id") for r in items] != list(range(1, n + 1)):
        raise InputError(f"items.json must list ids 1..{n} in order", path / "items.json")
    tensors = load_tensors(path / "popularity.safetensors", expected_sha256=info["files"]["popularity.safetensors"])
    counts = tensors.get("counts")
    if counts is None or counts.shape != (n + 1,) or not bool(torch.isfinite(counts).all() and (counts >= 0).all()):
        raise InputError(f"popularity 'counts' must be {n + 1} finite counts", path / "popularity.safetensors")
    return Bundle(path, info, _load_model(path, info), ["<pad>"] + [str(r["item"]) for r in items],
                  [None] + [r.get("title") for r in items], counts.float())


@dataclass
class Query:
    history: list[int]  # internal ids, oldest first
    k: int
    exclude_seen: bool


class Recommender:
    """Validates requests against the catalogue and scores many of them in one batched pass."""

    def __init__(self, bundle: Bundle, empty_history: str = "error"):
        if empty_history not in EMPTY_HISTORY:
            raise InputError(f"empty_history must be one of {', '.join(EMPTY_HISTORY)}, got {empty_history!r}")
        self.bundle = bundle
        self.model = bundle.model
        self.n_items = bundle.info["n_items"]
        self.empty_history = empty_history
        self.index = {item: i for i, item in enumerate(bundle.ids) if i > 0}
        counts = bundle.popularity
        self.popular = counts / counts.sum().clamp(min=1)  # an item's share of all interactions, in [0, 1]

    def query(self, obj: Any, where: str = "") -> Query:
        """A request object {"history": [...], "k": 10, "exclude_seen": true} -> Query; InputError names the fault."""
        if not isinstance(obj, dict):
            raise InputError(f"{where}request must be a JSON object")
        extra = sorted(set(obj) - {"history", "k", "exclude_seen"})
        if extra:
            raise InputError(f"{where}unknown field(s) {', '.join(map(repr, extra))}; "
                             "expected history, k, exclude_seen")
        if "history" not in obj:
            raise InputError(f"{where}missing field 'history'")
        k = obj.get("k", min(10, self.n_items))
        if type(k) is not int or not 1 <= k <= self.n_items:
            raise InputError(f"{where}k must be an integer between 1 and {self.n_items}, got {k!r}")
        exclude_seen = obj.get("exclude_seen", True)
        if type(exclude_seen) is not bool:
            raise InputError(f"{where}exclude_seen must be true or false, got {exclude_seen!r}")
        return Query(self.history(obj["history"], where), k, exclude_seen)

    def history(self, values: Any, where: str = "") -> list[int]:
        if not isinstance(values, list):
            raise InputError(f"{where}history must be a list of item ids")
        out, unknown = [], []
        for j, v in enumerate(values):
            if type(v) not in (str, int):
                raise InputError(f"{where}history[{j}] must be an item id (string or integer), got {v!r}")
            i = self.index.get(str(v))
            if i is None:
                unknown.append(str(v))
            out.append(i)
        if unknown:
            shown = ", ".join(map(repr, unknown[:20])) + (f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else "")
            raise InputError(f"{where}unknown item ids: {shown}")
        if not out and self.empty_history == "error":
            raise InputError(f"{where}history is empty (a server started with --empty-history popular "
                             "answers it with the most popular items)")
        return out

    def recommend(self, queries: list[Query]) -> list[dict[str, Any]]:
        """One model pass for all non-empty histories; empty ones (fallback mode) get the popularity ranking, scored
        by each item's share of all interactions. A non-finite model score is never listed (JSON has no NaN)."""
        rows = [r for r, q in enumerate(queries) if q.history]
        with torch.inference_mode():
            scores = self.popular.repeat(len(queries), 1)
            if rows:
                x = pad_left([queries[r].history for r in rows], self.model.max_len)
                scores[rows] = self.model.score_all(x).float()
            scores = torch.where(torch.isfinite(scores), scores, float("-inf"))
            scores[:, 0] = float("-inf")
            out = []
            for r, q in enumerate(queries):
                if q.exclude_seen and q.history:
                    scores[r, q.history] = float("-inf")
                values, indices = torch.topk(scores[r], q.k)
                out.append({"items": [{"item": self.bundle.ids[i], "title": self.bundle.titles[i], "score": s}
                                      for i, s in zip(indices.tolist(), values.tolist())
                                      if s != float("-inf")],  # fewer unseen items than k: never list a masked one
                            "source": "model" if q.history else "popular"})
        return out

    def info(self) -> dict[str, Any]:
        i = self.bundle.info
        out = {"kind": i["kind"], "dataset": i["dataset"], "n_items": i["n_items"], "max_len": i["max_len"],
               "version": i["version"], "server_version": __version__, "empty_history": self.empty_history}
        for key in ("backbone", "watermark"):
            if key in i:
                out[key] = i[key]
        return out


class MicroBatcher:
    """Single requests that arrive while the model is busy are scored together in its next pass.

    Scoring runs on the event loop, so during a pass new requests wait in their sockets; the next loop iteration
    parses all of them, and the flush scheduled by the first one runs after the others have joined. A lone
    request is scored at once, alone. A batch of 8 Beauty SASRec requests costs about 2.5 ms against 1.1 ms for
    one. A row's scores may differ from scoring it alone in the last float bits (kernels block by batch size).
    """

    def __init__(self, rec: Recommender):
        self.rec = rec
        self.pending: list[tuple[Query, asyncio.Future]] = []

    async def recommend(self, query: Query) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if not self.pending:
            loop.call_soon(self._flush)
        future = loop.create_future()
        self.pending.append((query, future))
        return await future

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        try:
            results = self.rec.recommend([q for q, _ in batch])
        except Exception as e:  # a server fault: every waiting request gets it (a 500), none hangs
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():  # its request was cancelled meanwhile
                future.set_result(result)


class ModelSlot:
    """The model being served, swappable between requests: a request takes `current` once and finishes on it,
    so a swap never changes the model under a request in flight. Each model has its own batcher, so a pass
    never mixes requests validated against two catalogues."""

    def __init__(self, rec: Recommender):
        self.current = (rec, MicroBatcher(rec))

    def swap(self, rec: Recommender) -> None:
        self.current = (rec, MicroBatcher(rec))


async def body_json(request: Any, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request body as JSON: 413 over the size limit (checked while reading), 400 when not JSON."""
    from fastapi import HTTPException

    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body_bytes:
        raise HTTPException(413, f"request body over {max_body_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise HTTPException(413, f"request body over {max_body_bytes} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPException(400, "request body is not valid JSON") from None


def reply(obj: Any) -> Any:
    """Plain json.dumps: FastAPI's generic encoder costs more than the SASRec forward pass here."""
    from fastapi.responses import Response

    return Response(json.dumps(obj, separators=(",", ":"), allow_nan=False), media_type="application/json")


def _request_bodies(max_batch: int) -> tuple[dict, dict]:
    """OpenAPI request bodies of /recommend and /recommend/batch, from pydantic models. The endpoints still read
    and check bodies themselves (one-line 400/413/422 answers); these models only document them."""
    from pydantic import BaseModel, ConfigDict, Field

    class RecommendRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: list[str | int] = Field(description="original item ids, oldest first")
        k: int = Field(10, ge=1, description="how many items (at most n_items; default min(10, n_items))")
        exclude_seen: bool = Field(True, description="never recommend an item of the history")

    class BatchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        requests: list[RecommendRequest] = Field(min_length=1, max_length=max_batch)

    def inline(node: Any, defs: dict) -> Any:  # the nested model written out: no components to register
        if isinstance(node, dict):
            return inline(defs[node["$ref"]], defs) if "$ref" in node else {k: inline(v, defs) for k, v in node.items()}
        return [inline(v, defs) for v in node] if isinstance(node, list) else node

    def body(model: type[BaseModel]) -> dict:
        schema = model.model_json_schema(ref_template="{model}")
        schema = inline(schema, schema.pop("$defs", {}))
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    return body(RecommendRequest), body(BatchRequest)


def create_app(bundle_path: str | Path, *, max_body_bytes: int = MAX_BODY_BYTES, empty_history: str = "error",
               max_batch: int = MAX_BATCH, lifespan: Any = None):
    """The FastAPI app for one bundle. Bodies are read and checked here (size, JSON, fields) so that no client
    input reaches a code path that could answer 500. `app.state.slot` holds the served model (see live.py)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    rec = Recommender(load_bundle(bundle_path), empty_history)
    slot = ModelSlot(rec)
    one_body, batch_body = _request_bodies(max_batch)
    app = FastAPI(title="llmd4rec", version=__version__, lifespan=lifespan)
    app.state.recommender = rec
    app.state.slot = slot

    @app.exception_handler(InputError)
    async def _unprocessable(request: Request, e: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.get("/health")
    async def health() -> Response:
        return reply({"status": "ok"})

    @app.get("/info")
    async def info() -> Response:
        return reply(slot.current[0].info())

    @app.post("/recommend", openapi_extra=one_body)
    async def recommend(request: Request) -> Response:
        rec, batcher = slot.current
        return reply(await batcher.recommend(rec.query(await body_json(request, max_body_bytes))))

    @app.post("/recommend/batch", openapi_extra=batch_body)
    async def recommend_batch(request: Request) -> Response:
        rec = slot.current[0]
        obj = await body_json(request, max_body_bytes)
        if not isinstance(obj, dict) or set(obj) != {"requests"} or not isinstance(obj["requests"], list):
            raise InputError('body must be {"requests": [request, ...]}')
        if not 1 <= len(obj["requests"]) <= max_batch:
            raise InputError(f"requests must hold 1 to {max_batch} requests, got {len(obj['requests'])}")
        queries = [rec.query(q, f"requests[{r}]: ") for r, q in enumerate(obj["requests"])]
        return reply({"results": rec.recommend(queries)})

    return app


def serve(bundle: Path, host: str = "127.0.0.1", port: int = 8000, empty_history: str = "error") -> None:
    """`llmd4rec serve`: one process; the model runs on the event loop, requests micro-batched (MicroBatcher).

    A SASRec request is ~1 ms of small matrix work: a second intra-op thread only adds wake-ups (on a busy 2-core
    machine a Beauty SASRec pass took ~1 ms with one thread and 120+ ms with two), so a CRM bundle gets one torch
    thread; an LLM bundle keeps torch's default, its matrices are large enough to split. Access logging is off
    for latency; errors are still logged.
    """
    run_app(create_app(bundle, empty_history=empty_history), host, port)


def run_app(app: Any, host: str, port: int) -> None:
    """uvicorn with one torch thread for a CRM bundle (see `serve`)."""
    import uvicorn

    if app.state.recommender.bundle.info["kind"] == "crm":
        torch.set_num_threads(1)
    sock = _listen(host, port)  # bound here, so that a port in use is one line, not uvicorn's exit
    config = uvicorn.Config(app, host=host, port=sock.getsockname()[1], access_log=False, log_level="info")
    uvicorn.Server(config).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be between 0 and 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def recommend_cli(bundle: Path, history_str: str, k: int, exclude_seen: bool = True) -> None:
    """`llmd4rec recommend`: the same validation and ranking as the server, printed as a table."""
    rec = Recommender(load_bundle(bundle))
    history = [s.strip() for s in history_str.split(",") if s.strip()]
    query = rec.query({"history": history, "k": k, "exclude_seen": exclude_seen})
    result = rec.recommend([query])[0]
    titles = rec.bundle.titles
    if any(titles[i] for i in query.history):  # what the history was, when the dataset names its items
        print("history:\n" + "".join(f"  {rec.bundle.ids[i]}  {titles[i] or ''}\n" for i in query.history))
    width = max((len(r["item"]) for r in result["items"]), default=4)
    print(f"{'rank':>4}  {'item':<{width}}  {'score':>9}  title")
    for n, r in enumerate(result["items"], 1):
        print(f"{n:>4}  {r['item']:<{width}}  {r['score']:>9.4f}  {r['title'] or ''}")
