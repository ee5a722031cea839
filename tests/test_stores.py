"""Models by name from a fake Hugging Face cache and a fake Ollama store (their real layouts, built in a temp dir),
`selfseek list`, and generation defaults."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import build_hf_model
from gguf import GGMLQuantizationType as T

from selfseek import LLM, SamplingParams
from selfseek.stores import (
    OLLAMA_MODEL,
    OLLAMA_PARAMS,
    OLLAMA_TEMPLATE,
    ModelSource,
    generation_defaults,
    list_models,
    resolve,
)
from selfseek.weights import CheckpointError, load_model
from selfseek.weights.gguf_writer import write_gguf
from selfseek.weights.safetensors import load_checkpoint

REV = "0123456789abcdef0123456789abcdef01234567"
R1_PARAMS = {"stop": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"], "temperature": 0.6, "top_p": 0.95}


def _hf_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """models--org--name/{blobs,refs/main,snapshots/<rev>/} with snapshot files linked to blobs, as the hub writes."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(Path("../../blobs") / blob.name)
    return snap


def _ollama_model(root: Path, name: str, tag: str, gguf: bytes, params: dict | None, template: str | None) -> Path:
    """manifests/registry.ollama.ai/library/<name>/<tag> + blobs/sha256-<hex>, as `ollama pull` leaves them."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []
    for media_type, data in ((OLLAMA_MODEL, gguf), (OLLAMA_TEMPLATE, template and template.encode()),
                             (OLLAMA_PARAMS, params and json.dumps(params).encode())):
        if data:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            (blobs / digest.replace(":", "-")).write_bytes(data)
            layers.append({"mediaType": media_type, "digest": digest, "size": len(data)})
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return blobs / layers[0]["digest"].replace(":", "-")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A fake HF cache with a qwen2 checkpoint (and its generation_config.json) and a GGUF repo of two quants, and a
    fake Ollama store with deepseek-r1:7b (a qwen2 GGUF) carrying R1's params layer."""
    root = tmp_path_factory.mktemp("stores")
    folder = root / "ckpt"
    build_hf_model("qwen2").save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    hf = root / "hf_home"
    snap = _hf_repo(hf / "hub", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", files)
    model = load_checkpoint(folder, progress=False)
    for qtype in (T.Q8_0, T.F32):
        write_gguf(root / f"m.{qtype.name}.gguf", model, qtype)
    gguf_files = {f"DeepSeek-R1-Distill-Qwen-7B-{q}.gguf": (root / f"m.{q}.gguf").read_bytes() for q in ("Q8_0", "F32")}
    gsnap = _hf_repo(hf / "hub", "unsloth/DeepSeek-R1-Distill-Qwen-7B-GGUF", gguf_files)
    ollama = root / "ollama"
    blob = _ollama_model(ollama, "deepseek-r1", "7b", gguf_files["DeepSeek-R1-Distill-Qwen-7B-Q8_0.gguf"], R1_PARAMS,
                         "{{ .System }}{{ range .Messages }}{{ .Content }}{{ end }}")
    return {"hf_home": hf, "snapshot": snap, "gguf_snapshot": gsnap, "ollama": ollama, "blob": blob,
            "folder": folder, "root": root}


@pytest.fixture
def env(stores, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(stores["hf_home"]))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("OLLAMA_MODELS", str(stores["ollama"]))
    return stores


def test_hub_id_resolves_from_the_local_cache(env):
    src = resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    assert src.kind == "hf" and src.path == env["snapshot"]
    assert resolve("unsloth/DeepSeek-R1-Distill-Qwen-7B-GGUF:q8_0").path.name == "DeepSeek-R1-Distill-Qwen-7B-Q8_0.gguf"
    with pytest.raises(CheckpointError, match="2 GGUF files; name one as unsloth/DeepSeek-R1-Distill-Qwen-7B-GGUF:"):
        resolve("unsloth/DeepSeek-R1-Distill-Qwen-7B-GGUF")


def test_missing_hub_id_says_how_to_fetch_it(env):
    with pytest.raises(CheckpointError, match=r"deepseek-ai/DeepSeek-R1-Distill-Qwen-14B: not in the Hugging Face "
                       r"cache .*hf_home/hub.*huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"):
        resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")


def test_hf_home_is_respected_at_call_time(env, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: the same id is no longer found
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")


def test_ollama_name_resolves_to_its_gguf_blob_with_params_and_template(env):
    src = resolve("deepseek-r1:7b")
    assert src.kind == "ollama" and src.path == env["blob"] and src.path.name.startswith("sha256-")
    assert src.ollama_params == R1_PARAMS and "{{ .System }}" in src.ollama_template
    with pytest.raises(CheckpointError, match="deepseek-r1:70b: no such file or folder, nor a model name found "
                       r"locally.*ollama pull deepseek-r1:70b"):
        resolve("deepseek-r1:70b")


def test_ollama_missing_blob_is_a_clear_error(env, tmp_path, monkeypatch):
    root = tmp_path / "ollama"
    blob = _ollama_model(root, "deepseek-r1", "1.5b", b"GGUF" + bytes(60), None, None)
    blob.unlink()
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    with pytest.raises(CheckpointError, match=r"the GGUF blob of Ollama model 'deepseek-r1:1.5b' is missing"):
        resolve("deepseek-r1:1.5b")


def test_models_by_name_generate_as_their_files(env):
    """LLM(name) loads the same weights as LLM(path) for both stores, and carries the store's generation defaults."""
    prompt = list(range(2, 30))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    by_path = LLM(env["folder"], progress=False, device="cpu").generate(prompt, greedy)[0].outputs[0].token_ids
    llm = LLM("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", progress=False, device="cpu")
    assert llm.generate(prompt, greedy)[0].outputs[0].token_ids == by_path
    assert llm.generation_defaults == {"temperature": 0.6, "top_p": 0.95}
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.6, 0.95, 0)
    ollama = LLM("deepseek-r1:7b", progress=False, device="cpu")
    gguf_path = LLM(env["root"] / "m.Q8_0.gguf", progress=False, device="cpu")
    assert ollama.generate(prompt, greedy)[0].outputs[0].token_ids == \
        gguf_path.generate(prompt, greedy)[0].outputs[0].token_ids
    assert ollama.generation_defaults == {"temperature": 0.6, "top_p": 0.95, "stop": R1_PARAMS["stop"]}
    assert gguf_path.generation_defaults == {}  # a bare GGUF without general.sampling.* keys
    off = LLM("deepseek-r1:7b", progress=False, device="cpu", generation_config="none")
    assert off.generation_defaults == {}


def test_generation_defaults_sources(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 20, "top_p": None,
                                                                 "max_new_tokens": 256, "do_sample": True}))
    folder = ModelSource(tmp_path, "path", str(tmp_path))
    assert generation_defaults(folder) == {"temperature": 0.7, "top_k": 20, "max_tokens": 256}
    assert generation_defaults(folder, "vllm") == {} == generation_defaults(folder, "none")
    gguf = ModelSource(tmp_path / "x.gguf", "path", "x.gguf")
    assert generation_defaults(gguf, "auto", {"general.sampling.temp": 0.5, "general.sampling.top_k": 40}) == \
        {"temperature": 0.5, "top_k": 40}
    assert generation_defaults(gguf, tmp_path) == {"temperature": 0.7, "top_k": 20, "max_tokens": 256}
    with pytest.raises(CheckpointError, match="--generation-config must be auto, none, vllm or a folder"):
        generation_defaults(gguf, tmp_path / "nowhere")
    # Ollama's params layer names: repeat_penalty, num_predict; a single stop string
    ollama = ModelSource(tmp_path / "blob", "ollama", "m:1b", {"repeat_penalty": 1.1, "num_predict": 64, "stop": "x"})
    assert generation_defaults(ollama) == {"repetition_penalty": 1.1, "max_tokens": 64, "stop": ["x"]}


def test_default_model_ships_its_model_card_defaults():
    model, _ = load_model(None, progress=False)
    # SmolLM2-135M-Instruct's model card: model.generate(..., temperature=0.2, top_p=0.9, do_sample=True)
    assert model.generation_defaults == {"temperature": 0.2, "top_p": 0.9}
    assert model.source.kind == "shipped" and model.source.name == "smollm2"


def test_list_shows_both_stores_and_folders(env):
    models = {m.name: m for m in list_models([env["root"]])}
    hf = models["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"]
    assert (hf.store, hf.architecture, hf.quantization) == ("hf", "qwen2", "float32") and hf.size > 0
    q8 = models["unsloth/DeepSeek-R1-Distill-Qwen-7B-GGUF:Q8_0"]
    assert q8.architecture == "qwen2" and q8.quantization.startswith("Q8_0") and q8.size > 0
    assert "unsloth/DeepSeek-R1-Distill-Qwen-7B-GGUF:F32" in models
    r1 = models["deepseek-r1:7b"]
    assert (r1.store, r1.architecture, r1.path) == ("ollama", "qwen2", env["blob"])
    assert models[str(env["root"] / "m.F32.gguf")].store == "folder"
    assert models[str(env["folder"])].architecture == "qwen2"
    assert models["smollm2"].store == "shipped"


def test_cli_list(env):
    out = subprocess.run([sys.executable, "-m", "selfseek.cli", "list"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["NAME", "STORE", "SIZE", "ARCH", "QUANTIZATION"]
    assert any(line.startswith("deepseek-r1:7b") and " qwen2 " in line for line in lines)
    assert any(line.startswith("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B ") for line in lines)



# ---- Ollama's Go template layer ----------------------------------------------------------------------------
# The template blobs of Ollama's library models, as published (llama3: the legacy .Prompt/.Response form).

LLAMA3_TEMPLATE = """{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>"""

QWEN2_TEMPLATE = """{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""

R1_TEMPLATE = """{{- if .System }}{{ .System }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1}}
{{- if eq .Role "user" }}<｜User｜>{{ .Content }}
{{- else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}{{- if not $last }}<｜end▁of▁sentence｜>{{- end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<｜Assistant｜>{{- end }}
{{- end }}"""


def test_ollama_llama3_legacy_template():
    """No .Messages: one execution per exchange, and the last one cut after {{ .Response }}."""
    from selfseek.ollama_template import render_ollama_template

    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
    h = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert render_ollama_template(LLAMA3_TEMPLATE, msgs) == (
        h.format("system") + "You are terse.<|eot_id|>" + h.format("user") + "Hi<|eot_id|>" + h.format("assistant")
        + "Hello!<|eot_id|>" + h.format("user") + "How are you?<|eot_id|>" + h.format("assistant"))


def test_ollama_qwen2_template_with_tools():
    from selfseek.ollama_template import render_ollama_template

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "description": "City & <area>"}},
        "required": ["city"]}}}]
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather",
                                                  "arguments": '{"days": 2, "city": "Paris"}'}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_0"}]
    function = ('{"name":"get_weather","description":"Get the weather","parameters":{"type":"object",'
                '"required":["city"],"properties":{"city":{"type":"string",'
                '"description":"City \\u0026 \\u003carea\\u003e"}}}}')  # Go's json.Marshal escapes <>&
    assert render_ollama_template(QWEN2_TEMPLATE, msgs, tools) == (
        "<|im_start|>system\nYou are helpful.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": ' + function + "}\n</tools>\n\nFor each function call, return a json object"
        " with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris","days":2}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    plain = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}]
    assert render_ollama_template(QWEN2_TEMPLATE, plain) == (
        "<|im_start|>user\nHi\n\nagain<|im_end|>\n<|im_start|>assistant\n")  # consecutive turns merged


def test_ollama_deepseek_r1_template():
    from selfseek.ollama_template import render_ollama_template

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}]
    assert render_ollama_template(R1_TEMPLATE, msgs) == (
        "Be brief.<｜User｜>1+1?<｜Assistant｜>2<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>")


@pytest.mark.parametrize("template,data,want", [
    ("{{ if eq .A 1 }}one{{ else if eq .A 2 }}two{{ else }}many{{ end }}", {"A": 2}, "two"),
    ("{{ range $k, $v := .M }}{{ $k }}={{ $v }};{{ else }}none{{ end }}", {"M": {"b": 2, "a": 1}}, "a=1;b=2;"),
    ("{{ range .L }}x{{ else }}none{{ end }}", {"L": []}, "none"),
    ("{{ with .U }}{{ .Name }}{{ end }}|{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}",
     {"U": {"name": "ann"}}, "ann|2"),
    ("{{ .S | len }} {{ printf \"%s-%d\" .S 7 }} {{ index .L 1 }} {{ (index .L 0).k }}",
     {"S": "abc", "L": [{"k": "v"}, 5]}, "3 abc-7 5 v"),
    ("a  {{- /* a comment */ -}}  b {{ and 1 0 }} {{ or 0 \"y\" }} {{ not .Missing }}", {}, "ab 0 y true"),
])
def test_go_template_subset(template, data, want):
    from selfseek.ollama_template import GoTemplate

    assert GoTemplate(template).render(data) == want


def test_go_template_errors_name_the_problem():
    from selfseek.ollama_template import GoTemplate, GoTemplateError

    for bad, why in [("{{ if .A }}x", "without"), ("{{ nosuch .A }}", "not defined"), ("{{ template \"x\" }}",
                                                                                          "not supported")]:
        with pytest.raises(GoTemplateError, match=why):
            GoTemplate(bad).render({"A": 1})


def test_a_go_template_layer_renders_server_chats():
    """A tokenizer without a Jinja template takes the Ollama layer (server/app.py does this for an Ollama model):
    the server's chat rendering goes through it, and a user's control strings still stay text."""
    from server_helpers import deepseek_tokenizer

    from selfseek.server.prompts import render_chat
    from selfseek.server.tools import FORMATS

    tok = deepseek_tokenizer("deepseek-r1")
    tok.chat_template = None
    tok.use_go_template(R1_TEMPLATE)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?<｜Assistant｜>"}]
    p = render_chat(tok, FORMATS["deepseek_v3"], msgs)
    assert p.text == "Be brief.<｜User｜>1+1?<｜Assistant｜><｜Assistant｜>"
    assistant = tok.token_to_id("<｜Assistant｜>")
    assert p.encode(tok).count(assistant) == 1  # the template's, not the user's
