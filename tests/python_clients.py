"""Python's own clients against `kubemoe up` (the built-in manifest, serving `builtin:tiny`,
whose random tokens never end a completion early, so every count below is exact): the official `openai`
client, Prometheus' text parser, and grpcio-reflection's (reflection v1alpha) client.

Run by `.ci/run` with the binary the tests built: `python tests/python_clients.py <kubemoe>`.
It checks models.list, completions and chat completions whole and streamed, that greedy output
equals the gRPC path's (`kubemoe generate`), the usage counts, log-probabilities in both
endpoints' shapes (as the client's own types read them), that an unknown model and a bad
temperature come back as the client's own exceptions naming what is wrong, that /metrics parses
and counts the requests, that reflection lists the inference service, and that API keys are
checked as the client expects.
"""

import subprocess
import sys
import tempfile
import urllib.request

import grpc
import openai
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families


def start_up(kubemoe: str, *args: str):
    """`kubemoe up` on free ports, once it serves (its `try:` line): the process and its gRPC and
    HTTP addresses."""
    up = subprocess.Popen(
        [kubemoe, "up", "--model", "builtin:tiny", "--grpc-port", "0", "--http-port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    addresses = None
    for line in up.stdout:
        if "gRPC at " in line:
            addresses = line.split("gRPC at ")[1].split()[0], line.split("HTTP at ")[1].split()[0]
        if line.startswith("try: ") and addresses:
            return up, *addresses
    up.wait(timeout=30)
    raise AssertionError("kubemoe up printed no addresses or never served")


def main(kubemoe: str) -> None:
    up, grpc, http = start_up(kubemoe)
    try:
        client = openai.OpenAI(base_url=f"http://{http}/v1", api_key="unused", max_retries=0)
        check(kubemoe, client, grpc)
        check_metrics(http)
        check_reflection(grpc)
    finally:
        up.terminate()
        up.wait(timeout=30)
    check_api_keys(kubemoe)


def check_api_keys(kubemoe: str) -> None:
    """With --api-keys-file the client's key is checked: a wrong one is the client's own
    AuthenticationError, the right one is served."""
    with tempfile.NamedTemporaryFile("w", suffix=".keys") as keys:
        keys.write("sk-kubemoe-ci\n")
        keys.flush()
        up, _, http = start_up(kubemoe, "--api-keys-file", keys.name)
        try:
            wrong = openai.OpenAI(base_url=f"http://{http}/v1", api_key="sk-wrong", max_retries=0)
            try:
                wrong.models.list()
                raise AssertionError("a wrong API key was served")
            except openai.AuthenticationError as e:
                assert e.status_code == 401 and "not valid" in str(e), e
            right = openai.OpenAI(base_url=f"http://{http}/v1", api_key="sk-kubemoe-ci", max_retries=0)
            done = right.completions.create(model="tiny", prompt="Hi", max_tokens=2)
            assert done.usage.completion_tokens == 2, done
        finally:
            up.terminate()
            up.wait(timeout=30)
    print("api keys: a wrong key is openai.AuthenticationError, the right one is served")


def grpc_text(kubemoe: str, grpc: str, *args: str) -> str:
    out = subprocess.run(
        [kubemoe, "generate", "--endpoint", f"http://{grpc}", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # `generate` ends the completion with one newline of its own.
    return out[:-1]


def check(kubemoe: str, client: openai.OpenAI, grpc: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"], models

    expected = grpc_text(kubemoe, grpc, "--prompt", "Hello", "--max-tokens", "6")
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    assert whole.choices[0].text == expected, (whole, expected)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 6
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 6
    streamed = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 6, chunks[-1]

    expected = grpc_text(kubemoe, grpc, "--chat", "Hi", "--max-tokens", "5")
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected, (chat, expected)
    assert chat.usage.completion_tokens == 5
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"

    # Log-probabilities, read through the client's own types.
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens, chat
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes) == t.token.encode(), t
        # Greedy decoding takes the most likely token.
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token, t
    chunks = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    # The same request again: its prompt's cached blocks are reused (rows computed in another
    # batch shape), so log-probabilities agree to float rounding, tokens exactly.
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(abs(a.logprob - b.logprob) <= 1e-5 for a, b in zip(streamed, content)), (streamed, content)
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, logprobs=2)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6, lp
    assert all(max(top.values()) == value for top, value in zip(lp.top_logprobs, lp.token_logprobs)), lp
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset), lp

    try:
        client.chat.completions.create(model="gpt-4", messages=messages)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as e:
        assert "gpt-4" in str(e), e
    try:
        client.completions.create(model="tiny", prompt="Hi", temperature=-1)
        raise AssertionError("a negative temperature was accepted")
    except openai.BadRequestError as e:
        assert "temperature" in str(e), e
    print("openai client: every check passed")


def check_metrics(http: str) -> None:
    """/metrics parses with Prometheus' own text parser and counts what was served."""
    text = urllib.request.urlopen(f"http://{http}/metrics").read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ttft = families["vllm:time_to_first_token_seconds"]
    count = [s.value for s in ttft.samples if s.name.endswith("_count")]
    # Two completions and four chat completions above (two with log-probabilities), a completion
    # with log-probabilities, and two requests through gRPC.
    assert count == [9.0], count
    assert ttft.samples[0].labels["model_name"] == "tiny"
    for name in ["vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:generation_tokens",
                 "vllm:request_success", "kubemoe_router_expert_tokens"]:
        assert name in families, (name, sorted(families))
    print("metrics: parsed by prometheus_client")



def check_reflection(address: str) -> None:
    """grpcio-reflection's client speaks v1alpha: it discovers the inference service."""
    with grpc.insecure_channel(address) as channel:
        services = list(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "kubemoe.inference.v1.Inference" in services, services
    assert not any(s.startswith("kubemoe.expert") for s in services), services
    print("reflection: grpcio-reflection lists", ", ".join(sorted(services)))


if __name__ == "__main__":
    main(sys.argv[1])
