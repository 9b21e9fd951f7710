"""The `trtqwen` command line: each command parses its options, calls one function, prints."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from trtqwen.clients.client import DEFAULT_MAX_TOKENS
from trtqwen.errors import UserError
from trtqwen.precision import parse_kv_dtype, parse_precision
from trtqwen.qwen_tokenizer import DEFAULT_SYSTEM

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Build Qwen2.5 into TensorRT-LLM engines for RTX 4090D GPUs, package them for Triton, serve and test them.",
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


def fail(e: UserError) -> None:
    err.print(f"[bold red]error:[/] {e.message}")
    if e.hint:
        err.print(f"  [yellow]→[/] {e.hint}")
    raise typer.Exit(2)


def command(fn):
    """app.command() whose UserError becomes the message and its hint (exit 2), never a traceback."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(e)
    return app.command()(run)


def _option_parser(parse):
    """A Typer parser from one of trtqwen's: its UserError becomes the option's error, hint included."""
    def parser(value: str):
        try:
            return parse(value)
        except UserError as e:
            raise typer.BadParameter(f"{e.message}; {e.hint}") from None
    return parser


# Options several commands share: the precision and KV dtype arrive as enums (aliases such as int4 accepted).
# Annotated as str: Typer 0.2x converts an Enum-annotated option again after its parser (and gets None).
PrecisionOption = KvDtypeOption = str
PRECISION = typer.Option("int4_awq", "--precision", "-p", parser=_option_parser(parse_precision), metavar="PRECISION",
                         help="bf16, fp16, int8_sq (int8), int8_wo, int4_awq (int4), int4_wo, fp8")
KV_DTYPE = typer.Option("auto", parser=_option_parser(parse_kv_dtype), metavar="KV", help="KV cache dtype: auto (bf16/fp16), int8, fp8")
TP = typer.Option(1, help="tensor parallel size: 1, 2 or 4")
TRITON_URL = typer.Option("127.0.0.1:8001", help="Triton gRPC address")
TRITON_MODEL = typer.Option("ensemble", help="ensemble or tensorrt_llm_bls")


@command
def plan(
    model: Optional[Path] = typer.Option(None, "--model", help="HF config.json or model dir; default: built-in Qwen2.5-7B dims"),
    gpu: str = typer.Option("rtx4090d", help="GPU profile: rtx4090d, rtx4090, l40s, a100-40g, a100-80g, h100, h200, custom"),
    precision: PrecisionOption = PRECISION,
    tp: int = TP,
    kv_cache_dtype: KvDtypeOption = KV_DTYPE,
    max_seq_len: int = typer.Option(4096, help="longest sequence (prompt + output) to plan for"),
    max_batch_size: int = typer.Option(32, help="largest batch the engine accepts"),
    prompt_len: int = typer.Option(1024, help="prompt length for the first-token estimate"),
    max_num_tokens: int = typer.Option(8192, help="tokens per engine step (sizes the activation memory)"),
    kv_fraction: Optional[float] = typer.Option(None, help="kv_cache_free_gpu_mem_fraction (default: 0.85 on 24 GB cards, else 0.9)"),
    memory_gib: Optional[float] = typer.Option(None, help="custom GPU: memory in GiB"),
    bandwidth_gbs: Optional[float] = typer.Option(None, help="custom GPU: memory bandwidth in GB/s"),
    tflops: Optional[float] = typer.Option(None, help="custom GPU: dense FP16 tensor TFLOPS"),
    target: str = typer.Option("both", help="engine (TensorRT-LLM 1.2.1), pytorch (its PyTorch backend) or both"),
    gpus: Optional[int] = typer.Option(None, help="GPUs in the box: also say which replicas × TP layout to serve it with"),
    latency: bool = typer.Option(False, help="with --gpus: choose for the fastest single stream, not the most tok/s"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
):
    """Memory and speed model: does it fit, how many users, how fast — before you build anything."""
    from trtqwen.build import plan as planning
    from trtqwen.build.spec import BuildSpec

    spec = BuildSpec(model=str(model) if model else "Qwen/Qwen2.5-7B-Instruct", precision=precision, tp=tp, gpu=gpu,
                     kv_cache_dtype=kv_cache_dtype, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                     max_input_len=min(max_seq_len, 2048), max_num_tokens=max_num_tokens)
    targets = planning.TARGETS if target == "both" else (target,)
    plans = {t: planning.plan_from_options(model, gpu, spec, prompt_len, kv_fraction, memory_gib, bandwidth_gbs, tflops, t)
             for t in targets}
    out = {t: p.to_dict() for t, p in plans.items()}
    out = out if len(out) > 1 else out[targets[0]]
    if gpus is not None:  # the box: replicas of TP-t copies, for the first target asked
        from trtqwen.build import box_plan

        shape, profile = planning.shape_and_gpu(model, gpu, memory_gib, bandwidth_gbs, tflops)
        layouts = box_plan.box_layouts(shape, profile, spec, gpus, prompt_len, kv_fraction, targets[0])
        best = box_plan.recommend(layouts, latency)
        out = {"plan": out, "box": box_plan.to_dict(layouts, best, gpus, spec)}
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        for p in plans.values():
            console.print(planning.plan_table(p))
        if gpus is not None:
            console.print(box_plan.box_table(layouts, best, gpus, profile.name, spec))
    if not any(p.fits for p in plans.values()) and (gpus is None or best is None):
        raise typer.Exit(1)


@command
def tiny(
    out: Path = typer.Option(Path("engines/tiny-qwen2"), "--out", "-o", help="directory to write the model to"),
    preset: str = typer.Option("tiny", help="shape: tiny (default, ~80 MB) or tiny-tp (shards at TP 2 and 4)"),
    seed: int = typer.Option(0, help="random seed for the weights"),
    force: bool = typer.Option(False, help="overwrite an existing directory"),
):
    """Make the embedded default: a tiny Qwen2 (real architecture, real Qwen vocabulary, random weights)."""
    from trtqwen.build.tiny import make_tiny

    path = make_tiny(out, preset=preset, seed=seed, force=force)
    console.print(f"tiny Qwen2 model ({preset}, seed {seed}) at [bold]{path}[/]")


@command
def build(
    model: str = typer.Option(..., "--model", "-m", help="Hugging Face hub id (Qwen/Qwen2.5-7B-Instruct) or a local directory"),
    precision: PrecisionOption = PRECISION,
    tp: int = TP,
    gpu: str = typer.Option("rtx4090d", help="GPU profile the engine is planned for"),
    kv_cache_dtype: KvDtypeOption = KV_DTYPE,
    max_batch_size: Optional[int] = typer.Option(None, help="default: from plan"),
    max_input_len: Optional[int] = typer.Option(None, help="default: half of max_seq_len"),
    max_seq_len: Optional[int] = typer.Option(None, help="default: 4096 (or the model's positions if fewer)"),
    max_num_tokens: Optional[int] = typer.Option(None, help="default: 8192"),
    calib_data: Optional[Path] = typer.Option(None, help="calibration texts (.jsonl with 'text' or .txt blocks); default: bundled set"),
    calib_size: Optional[int] = typer.Option(None, help="calibration samples (default 32; int4_awq on a CPU 16)"),
    calib_gpu_memory: Optional[float] = typer.Option(None, envvar="TRTQWEN_CALIB_GPU_MEMORY", metavar="GIB",
                                                     help="cap calibration's GPU memory (e.g. 24 reproduces a 4090D on a larger GPU)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default engines/<name>-<precision>-tp<N>)"),
    until: str = typer.Option("engine", help="stop after: fetch, checkpoint or engine"),
    target: str = typer.Option("engine", help="engine: TensorRT-LLM 1.2.1 engine (frozen; TP-sharded checkpoint → "
                                              "trtllm-build); pytorch: TensorRT-LLM's PyTorch backend (unified HF "
                                              "checkpoint, no engine: llmapi, trtllm-serve); both"),
    force: bool = typer.Option(False, help="redo stages even if their inputs are unchanged"),
):
    """HF checkpoint → quantized checkpoint (TensorRT-LLM TP shards, or ModelOpt's unified HF for the PyTorch
    backend) → engines (engine target), recorded in build.json."""
    from trtqwen.build.pipeline import run_build
    from trtqwen.build.spec import BuildSpec

    spec = BuildSpec.request(model, precision=precision, tp=tp, gpu=gpu, kv_cache_dtype=kv_cache_dtype,
                     max_batch_size=max_batch_size, max_input_len=max_input_len, max_seq_len=max_seq_len,
                     max_num_tokens=max_num_tokens, calib_data=str(calib_data) if calib_data else None,
                     calib_size=calib_size)
    try:
        run_build(spec, out=out, until=until, target=target, force=force, calib_gpu_memory=calib_gpu_memory,
                  console=console)
    except KeyboardInterrupt:  # stages write to a temporary place and rename: an interrupted one leaves nothing
        err.print("[yellow]interrupted:[/] the stage in progress was discarded (finished stages are kept); "
                  "rerun the same command to continue")
        raise typer.Exit(130) from None


@command
def package(
    build_dir: Path = typer.Argument(..., help="a build directory written by `trtqwen build`"),
    out: Path = typer.Option(Path("model_repo"), "--out", "-o", help="model repository to write"),
    runtime: str = typer.Option("torch", help="trtllm (engines, C++ backend, 4090D box), llmapi (TensorRT-LLM PyTorch backend) or torch (reference runtime, runs anywhere)"),
    max_batch_size: Optional[int] = typer.Option(None, help="default: the build's"),
    replicas: int = typer.Option(1, help="copies of the model, each on its own GPU(s) (`trtqwen plan` says how many)"),
    gpus: Optional[str] = typer.Option(None, help="GPU ids of the replicas, tp per replica: 0,1,2,3 (default); "
                                                  "0,0 puts two copies on GPU 0"),
    layout: str = typer.Option("servers", help="servers: one tritonserver per replica, nginx in front (`serve` starts "
                                               "both); instances: one tritonserver, one model instance per replica"),
    kv_cache_free_gpu_mem_fraction: Optional[float] = typer.Option(None, help="default: from the build's plan"),
    streaming: bool = typer.Option(True, "--streaming/--no-streaming", help="decoupled (streaming) models"),
    stream_interval: int = typer.Option(1, help="torch runtime: a streamed response every N tokens (fewer responses "
                                                "under load; TensorRT-LLM's and vLLM's stream_interval)"),
    force: bool = typer.Option(False, help="replace an existing repository"),
):
    """Write a Triton model repository (ensemble, preprocessing, tensorrt_llm, postprocessing, tensorrt_llm_bls)."""
    from trtqwen.serve.repo import generate_repo, read_record

    path = generate_repo(build_dir, out, runtime=runtime, max_batch_size=max_batch_size, replicas=replicas, gpus=gpus,
                         layout=layout,
                         kv_cache_free_gpu_mem_fraction=kv_cache_free_gpu_mem_fraction, streaming=streaming, force=force,
                         stream_interval=stream_interval)
    record = read_record(path)
    console.print(f"model repository ({record['runtime']} runtime) at [bold]{path}[/]")
    for note in record.get("notes", []):
        console.print(f"  [yellow]note:[/] {note}")
    console.print(f"serve it with: [bold]trtqwen serve {path}[/]")


@command
def serve(
    model_repo: Path = typer.Argument(Path("model_repo"), help="Triton model repository written by `trtqwen package`"),
    host: str = typer.Option("127.0.0.1", help="address to bind (127.0.0.1: this machine only)"),
    http_port: int = typer.Option(8000, help="HTTP port"),
    grpc_port: int = typer.Option(8001, help="gRPC port"),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port"),
    background: bool = typer.Option(False, help="return once the server is ready; stop it with --stop"),
    log: Optional[Path] = typer.Option(None, help="server log (default: <model_repo>/tritonserver.log)"),
    stop: bool = typer.Option(False, "--stop", help="stop the server started for this repository"),
    print_command: bool = typer.Option(False, "--print-command", help="show the exact command (and the container one) and exit"),
    timeout: float = typer.Option(300, help="seconds to wait for the server and every model to be ready"),
    openai_port: Optional[int] = typer.Option(None, help="also serve an OpenAI-compatible API on this port (foreground)"),
    replica_port_base: Optional[int] = typer.Option(None, help="replicas of the servers layout listen from here, 3 "
                                                                "ports each (default: HTTP port + 100)"),
    hang_timeout: float = typer.Option(120, help="servers layout: a replica whose 1-token probe gets no answer for this "
                                                 "long, twice in a row, is killed and started again"),
    engine: str = typer.Option("tritonserver", help="tritonserver (a model repository), or trtllm-serve (TensorRT-LLM's "
                                                    "OpenAI server on a --target pytorch build directory; GPU box)"),
    api_key: Optional[str] = typer.Option(None, envvar="TRTQWEN_API_KEY", help="with --openai-port: the key its "
                                          "clients must send (Authorization: Bearer); required beyond 127.0.0.1"),
):
    """Run tritonserver on a model repository (one MPI rank per GPU for TP) and wait until it is ready."""
    from trtqwen.serve import server

    if engine == "trtllm-serve":
        server.run_trtllm_serve(model_repo, print_command)
        return
    if engine != "tritonserver":
        raise UserError(f"unknown --engine {engine!r}", "use tritonserver or trtllm-serve")

    if stop:
        state = server.stop(model_repo)
        console.print(f"stopped (pid {state['pid']})" if state else "no server was running for this repository")
        return
    if print_command:
        for line in server.describe_commands(model_repo, host, http_port, grpc_port, metrics_port):
            print(line)
        return
    for warning in server.exposure_warnings(host, openai_port, api_key):
        Console(stderr=True).print(f"[bold red]warning:[/] {warning}")
    state = server.serve_repo(model_repo, host, http_port, grpc_port, metrics_port, log, timeout, replica_port_base,
                               hang_timeout)
    if "replicas" in state:
        console.print(f"{len(state['replicas'])} tritonservers ready behind nginx (least connections)\n"
                      f"  HTTP    http://{host}:{http_port}\n  gRPC    {host}:{grpc_port}\n  log     {state['log']}")
        for r in state["replicas"]:
            console.print(f"  {r['name']}: GPUs {r['gpus']}, gRPC :{r['grpc_port']}, metrics "
                          f"http://{host}:{r['metrics_port']}/metrics")
    else:
        console.print(f"tritonserver ready ({state['server']})\n  HTTP    http://{host}:{http_port}\n"
                      f"  gRPC    {host}:{grpc_port}\n  metrics http://{host}:{metrics_port}/metrics\n  log     {state['log']}")
    if background:
        console.print(f"stop it with: [bold]trtqwen serve {model_repo} --stop[/]")
        return
    console.print("Ctrl-C stops it." + (f" OpenAI-compatible API on http://{host}:{openai_port}/v1" if openai_port else ""))
    server.run_in_foreground(model_repo, state, host, grpc_port, openai_port, api_key)


TEXT_MODEL = typer.Option(None, help="Triton model; default: tensorrt_llm_bls when served (a stop cancels the "
                                     "request there), else ensemble")


@command
def chat(
    url: str = TRITON_URL,
    model: Optional[str] = TEXT_MODEL,
    system: str = typer.Option(DEFAULT_SYSTEM, help="system prompt"),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, help="longest answer"),
    temperature: float = typer.Option(0.7, help="sampling temperature"),
    top_p: float = typer.Option(0.8, help="nucleus sampling"),
):
    """Terminal chat that streams answers from the served model, keeps history, and shows tokens/s."""
    from trtqwen.clients.chat import chat_loop
    from trtqwen.clients.client import GenerationParams

    chat_loop(url, model, system, GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p), console)


@command
def ui(
    url: str = TRITON_URL,
    model: Optional[str] = TEXT_MODEL,
    repo: Optional[Path] = typer.Option(None, help="the served model repository, for the model panel (trtqwen_repo.json)"),
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(7860, help="port of the web page"),
    share: bool = typer.Option(False, "--share", help="also open a public gradio.live link (off unless given)"),
    concurrency: int = typer.Option(16, help="users streaming at once (each gets its own stream)"),
):
    """Gradio web demo that streams answers (binds 127.0.0.1, never shared publicly by default)."""
    from ui.app import launch

    console.print(f"web demo on http://{host}:{port} → Triton {url}" + (" (public share link requested)" if share else ""))
    launch(url=url, model=model, repo=str(repo) if repo else None, host=host, port=port, share=share,
           concurrency=concurrency)


@command
def smoke(
    url: str = TRITON_URL,
    model: str = TRITON_MODEL,
    content: bool = typer.Option(True, "--content/--no-content", help="judge answers' wording (off for the tiny random model)"),
    targets: bool = typer.Option(True, "--targets/--no-targets", help="judge 5 users' speed against the GPU targets "
                                                                      "(off for the reference runtime on a CPU)"),
):
    """Smoke-test a served model: readiness, streaming, CJK, JSON, stop words, 5 concurrent users, bad requests."""
    from trtqwen.clients.smoke import run_smoke, smoke_table

    checks = run_smoke(url, model, content, targets)
    console.print(smoke_table(checks, url, model, content))
    failed = [c.name for c in checks if not c.passed]
    if failed:
        err.print(f"[red]{len(failed)} check(s) failed:[/] {', '.join(failed)}")
        raise typer.Exit(1)


@command
def bench(
    url: str = TRITON_URL,
    model: Optional[str] = typer.Option(None, help="Triton model (default ensemble: ensemble or tensorrt_llm_bls); "
                                                   "with --openai the model name the API serves (default: the one "
                                                   "/v1/models lists)"),
    openai: Optional[str] = typer.Option(None, "--openai", metavar="URL",
                                         help="sweep an OpenAI-compatible server instead of Triton's gRPC (e.g. "
                                              "http://127.0.0.1:9000 from `trtqwen openai`): streamed /v1/completions, "
                                              "ignore_eos, one connection per user; --url is then unused"),
    api_key: Optional[str] = typer.Option(None, envvar="TRTQWEN_API_KEY", show_envvar=True,
                                          help="with --openai: the server's API key"),
    concurrency: str = typer.Option("1,2,4,8,16,32", help="comma-separated concurrency sweep"),
    input_len: int = typer.Option(128, help="prompt length in tokens (exact, with --tokenizer)"),
    output_len: int = typer.Option(64, help="output tokens per request (fixed: min_tokens = max_tokens)"),
    duration: float = typer.Option(20, help="seconds per concurrency level"),
    warmup: int = typer.Option(2, help="warm-up requests before measuring"),
    tokenizer: Optional[Path] = typer.Option(None, help="the served tokenizer dir (e.g. engines/<build>/tokenizer)"),
    metrics_url: Optional[str] = typer.Option(None, help="metrics address host:port (default: gRPC port + 1; with "
                                                         "--openai: none unless given)"),
    out: Path = typer.Option(Path("bench-results"), help="directory for JSON, CSV and PNG"),
    compare: Optional[Path] = typer.Option(None, "--compare", help="an earlier bench JSON to compare with"),
):
    """Load-test a served model over a concurrency sweep (Triton gRPC, or --openai URL); JSON, CSV and a PNG plot;
    --compare with an earlier run (of either kind)."""
    from trtqwen.clients import bench as bench_mod

    try:
        levels = [int(x) for x in concurrency.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--concurrency {concurrency!r} is not a list of integers", "e.g. --concurrency 1,2,4,8") from None
    progress = lambda lv: err.print(f"[dim]{lv['concurrency']} users: {lv['requests']} requests, "  # noqa: E731
                                    f"{lv['total_tok_s']:.1f} tok/s total, {lv['errors']} errors[/]")
    if openai is not None:
        r = bench_mod.run_bench_openai(openai, model, levels, input_len, output_len, duration, warmup,
                                       str(tokenizer) if tokenizer else None, metrics_url, progress=progress,
                                       api_key=api_key)
    else:
        r = bench_mod.run_bench(url, model or "ensemble", levels, input_len, output_len, duration, warmup,
                                str(tokenizer) if tokenizer else None, metrics_url, progress=progress)
    print(bench_mod.format_table(r))
    files = bench_mod.write_reports(r, out)
    console.print("wrote " + ", ".join(str(p) for p in files.values()))
    if compare:
        print(bench_mod.format_compare(bench_mod.compare(r, bench_mod.load_result(compare))))


@command
def openai(
    url: str = TRITON_URL,
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(9000, help="port for /v1/models, /v1/chat/completions, /v1/completions"),
    model: Optional[str] = TEXT_MODEL,
    served_model_name: str = typer.Option("qwen2.5", help="model name the API reports"),
    tokenizer: Optional[Path] = typer.Option(None, help="tokenizer dir, for prompt token counts in usage"),
    api_key: Optional[str] = typer.Option(None, envvar="TRTQWEN_API_KEY", show_envvar=True,
                                          help="require 'Authorization: Bearer KEY' on /v1/* (needed to bind "
                                               "anything but 127.0.0.1)"),
    allowed_origin: list[str] = typer.Option([], "--allowed-origin", help="a web origin (e.g. http://localhost:3000) "
                                             "whose pages may call the API, with CORS; repeatable; '*': any. "
                                             "Default: none, every cross-origin request is refused"),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="a Host name clients may use besides "
                                           "127.0.0.1, localhost, [::1] and --host (DNS rebinding protection); "
                                           "repeatable; '*': any"),
):
    """OpenAI-compatible endpoint in front of the Triton server (streaming SSE and not)."""
    from trtqwen.clients.openai import serve_openai

    console.print(f"OpenAI-compatible API on http://{host}:{port}/v1 → Triton {url} ({model or 'tensorrt_llm_bls, else ensemble'})"
                  + (" (API key required)" if api_key else ""))
    serve_openai(url, host, port, model, served_model_name, str(tokenizer) if tokenizer else None, api_key=api_key,
                 allowed_origins=tuple(allowed_origin), allowed_hosts=tuple(allowed_host))


@command
def deploy(
    values: list[Path] = typer.Option([], "--values", "-f", help="values file(s) of the chart (deploy/README.md)"),
    set_: list[str] = typer.Option([], "--set", help="key=value, as helm's --set (e.g. replicaCount=4)"),
    out: Path = typer.Option(Path("deploy/manifests"), "--out", "-o", help="directory for the rendered manifests"),
    name: str = typer.Option("trtqwen", help="release name"),
    namespace: str = typer.Option("default", help="namespace"),
):
    """Render the Helm chart (N one-GPU Triton pods, OpenAI proxy, HPA, bench Job) to manifests for `kubectl apply`."""
    from trtqwen.deploy import write_manifests

    files = write_manifests(values, set_, out, name, namespace)
    console.print(f"{len(files)} manifests in [bold]{out}[/] (validated against Kubernetes schemas); apply with: "
                  f"kubectl apply -n {namespace} -f {out}   (or: helm install {name} deploy/helm/trtqwen)")


@command
def verify(
    checkpoint: Path = typer.Argument(..., help="a checkpoint directory: engines/<build>/checkpoint (TensorRT-LLM) or hf_checkpoint (PyTorch backend)"),
    against: Optional[Path] = typer.Option(None, help="HF model dir to compare with (default: the build's source)"),
    prompts: Optional[Path] = typer.Option(None, help="prompts file: one per line, or .jsonl with 'text' (default: built-in mix)"),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
    thresholds: str = typer.Option("auto", help="trained, random-weights, or auto (random-weights when the reference "
                                                "reads the prompts at perplexity > 1000)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
):
    """Compare a checkpoint with its HF source: logits cosine, max error, top-1 agreement, perplexity."""
    from trtqwen.build.verify import verify as run_verify

    report = run_verify(checkpoint, against, prompts, device, thresholds)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        console.print(report.table())
        console.print(report.verdict)
    if not report.passed:
        raise typer.Exit(1)


@command
def doctor(as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """What this machine has for the job: Python, torch/CUDA, GPUs, TensorRT-LLM, tritonserver, mpirun, disk."""
    from trtqwen import doctor as doc

    report = doc.collect()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for table in doc.tables(report):
        console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
