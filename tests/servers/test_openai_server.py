"""The local OpenAI-compatible test server, driven by the real ``openai`` client on aiohttp."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .openai_server import FAULT_KINDS, OpenAITestServer, fingerprint, parse_fault_plan

openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")

SERVER_FILE = Path(__file__).with_name("openai_server.py")
MODEL = "viscon-test-vlm"
MC_PROMPT = (
    "Write 4 multiple-choice questions about the image described below. Use this format:\n"
    "<Human> question\n<Options>\nA. ...\nB. ...\nC. ...\nD. ...\n<Assistant> letter\n\n"
    "Caption: A ceramic mug stands on a wooden kitchen table beside a folded newspaper."
)
QA_PROMPT = (
    "Write 4 rounds of questions and answers about the image described below, as\n"
    "<Human> question\n<Assistant> answer\n\n"
    "Caption: A cyclist rides along a harbour promenade while seagulls circle above fishing boats."
)


def data_url(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode("ascii")


def caption_messages(
    image: bytes = b"\x89PNG tiny image bytes", url: str = "https://example.org/page-1"
) -> list:
    text = (
        f"Describe this image in detail. Page URL: {url}. Alt text: a red mug. "
        "Context: breakfast kitchen table."
    )
    return [
        {"role": "system", "content": "You write detailed, faithful image descriptions."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": data_url(image)}},
            ],
        },
    ]


def client_for(server: OpenAITestServer, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.base_url,
        api_key="test-key",
        http_client=openai.DefaultAioHttpClient(),
        max_retries=0,
        **kwargs,
    )


async def _complete(server: OpenAITestServer, messages: list, **kwargs):
    client = client_for(server, timeout=kwargs.pop("timeout", 10.0))
    try:
        return await client.chat.completions.create(model=MODEL, messages=messages, **kwargs)
    finally:
        await client.close()


def complete(server: OpenAITestServer, messages: list, **kwargs):
    return asyncio.run(_complete(server, messages, **kwargs))


def control(server: OpenAITestServer, path: str, body: object | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def raw_post(server: OpenAITestServer, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        server.base_url + "/chat/completions",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def shared_server():
    with OpenAITestServer() as server:
        yield server


@pytest.fixture
def server(shared_server):
    shared_server.reset()
    yield shared_server
    shared_server.set_faults([], latency_s=0.0)
    shared_server.reset()


# --- replies ---------------------------------------------------------------------------------------


def test_caption_reply_has_openai_shape_and_names_host_and_image(server):
    messages = caption_messages()
    response = complete(server, messages)
    content = response.choices[0].message.content
    image_hash = hashlib.sha256(data_url(b"\x89PNG tiny image bytes").encode()).hexdigest()
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert response.created == 0
    assert response.choices[0].finish_reason == "stop"
    assert "example.org" in content and image_hash[:12] in content
    assert 3 <= content.count(". ") + 1 <= 5
    assert "<Human>" not in content
    text = "\n".join([messages[0]["content"], messages[1]["content"][0]["text"]])
    assert response.usage.prompt_tokens == len(text) // 4 + 1 + 85
    assert response.usage.completion_tokens == len(content) // 4 + 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_different_images_give_different_captions(server):
    first = complete(server, caption_messages(b"image one")).choices[0].message.content
    second = complete(server, caption_messages(b"image two")).choices[0].message.content
    assert first != second


def test_multiple_choice_reply_is_four_well_formed_items(server):
    content = complete(server, [{"role": "user", "content": MC_PROMPT}]).choices[0].message.content
    item = re.compile(
        r"<Human> (.+)\n<Options>\nA\. (.+)\nB\. (.+)\nC\. (.+)\nD\. (.+)\n<Assistant> ([ABCD])"
    )
    items = item.findall(content)
    assert len(items) == 4
    assert content == "\n\n".join(m.group(0) for m in item.finditer(content))
    assert len({i[0] for i in items}) == 4  # four different questions
    assert all(len(set(i[1:5])) == 4 for i in items)  # four different options each


def test_free_form_reply_is_four_rounds(server):
    content = complete(server, [{"role": "user", "content": QA_PROMPT}]).choices[0].message.content
    lines = content.splitlines()
    assert len(lines) == 8
    assert all(line.startswith("<Human> ") for line in lines[0::2])
    assert all(line.startswith("<Assistant> ") for line in lines[1::2])
    assert "<Options>" not in content


def test_questions_vary_with_the_request(server):
    other = MC_PROMPT.replace("ceramic mug", "silver teapot")
    first = complete(server, [{"role": "user", "content": MC_PROMPT}]).choices[0].message.content
    second = complete(server, [{"role": "user", "content": other}]).choices[0].message.content
    assert first != second


def test_same_request_gives_same_reply_and_is_counted_twice(server):
    messages = caption_messages()
    first = complete(server, messages)
    second = complete(server, messages)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.id == second.id
    stats = server.stats()
    fp = fingerprint({"model": MODEL, "messages": messages})
    assert stats["total_requests"] == 2
    assert stats["fingerprint_counts"] == {fp: 2}
    assert stats["fingerprints"] == [fp, fp]
    assert stats["duplicates"] == [fp]


def test_replies_are_identical_across_server_instances():
    messages = [{"role": "user", "content": QA_PROMPT}]
    contents = []
    for _ in range(2):
        with OpenAITestServer() as fresh:
            contents.append(complete(fresh, messages).choices[0].message.content)
    assert contents[0] == contents[1]


def test_max_tokens_cuts_the_reply(server):
    response = complete(server, [{"role": "user", "content": QA_PROMPT}], max_tokens=10)
    assert response.choices[0].finish_reason == "length"
    assert len(response.choices[0].message.content) == 40


def test_models_endpoint_lists_models(server):
    async def run():
        client = client_for(server)
        try:
            return [m.id async for m in client.models.list()]
        finally:
            await client.close()

    assert MODEL in asyncio.run(run())


# --- validation ------------------------------------------------------------------------------------


def test_missing_authorization_is_401_and_key_is_never_echoed(server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, error = raw_post(server, body)
    assert status == 401 and error["error"]["code"] == "invalid_api_key"
    status, reply = raw_post(server, body, {"Authorization": "Bearer sk-secret-123"})
    assert status == 200 and "sk-secret-123" not in json.dumps(reply)
    assert "sk-secret-123" not in json.dumps(server.stats())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "model"),
        (json.dumps({"model": MODEL, "messages": "hi"}).encode(), "messages"),
        (
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
            ).encode(),
            "stream",
        ),
    ],
)
def test_malformed_requests_are_400(server, body, param):
    status, error = raw_post(server, body, {"Authorization": "Bearer k"})
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["param"] == param


@pytest.mark.parametrize(
    "url",
    ["https://example.org/cat.jpg", "data:image/png;base64,not*base64!", "data:text/plain;base64,aGk="],
)
def test_bad_image_parts_are_rejected(server, url):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError) as info:
        complete(server, messages)
    assert info.value.status_code == 400


def test_streaming_is_refused(server):
    with pytest.raises(openai.BadRequestError, match="stream"):
        complete(server, [{"role": "user", "content": "hi"}], stream=True)


# --- faults ----------------------------------------------------------------------------------------


def test_rate_limit_carries_retry_after_and_is_used_up(server):
    server.set_faults([{"kind": "429", "retry_after_s": 0.2}])
    messages = caption_messages()
    with pytest.raises(openai.RateLimitError) as info:
        complete(server, messages)
    assert info.value.response.headers["retry-after"] == "0.2"
    assert info.value.body["type"] == "rate_limit_error"
    assert complete(server, messages).choices[0].message.content
    stats = server.stats()
    assert stats["fault_counts"] == {"429": 1} and stats["status_counts"] == {"429": 1, "200": 1}


@pytest.mark.parametrize(
    ("kind", "error", "status"),
    [
        ("500", openai.InternalServerError, 500),
        ("503", openai.InternalServerError, 503),
        ("400", openai.BadRequestError, 400),
    ],
)
def test_status_faults_raise_the_matching_client_error(server, kind, error, status):
    server.set_faults([{"kind": kind}])
    with pytest.raises(error) as info:
        complete(server, caption_messages())
    assert info.value.status_code == status


def test_timeout_fault_makes_the_client_time_out(server):
    server.set_faults([{"kind": "timeout", "delay_s": 5}])
    started = time.perf_counter()
    with pytest.raises(openai.APITimeoutError):
        complete(server, caption_messages(), timeout=0.3)
    assert time.perf_counter() - started < 3


def test_drop_closes_the_connection(server):
    server.set_faults([{"kind": "drop"}])
    # The aiohttp transport maps a server disconnect to httpx's ConnectTimeout, so the client raises
    # APITimeoutError, a subclass of APIConnectionError, at once rather than after the timeout.
    started = time.perf_counter()
    with pytest.raises(openai.APIConnectionError):
        complete(server, caption_messages(), timeout=5)
    assert time.perf_counter() - started < 2
    assert server.stats()["status_counts"] == {"drop": 1}


@pytest.mark.parametrize("kind", ["garbled", "truncated_json"])
def test_unparsable_bodies_raise(server, kind):
    server.set_faults([{"kind": kind}])
    with pytest.raises((ValueError, openai.APIResponseValidationError)):
        complete(server, caption_messages())


def test_garbled_content_has_no_identifiers(server):
    clean = complete(server, [{"role": "user", "content": MC_PROMPT}]).choices[0].message.content
    server.set_faults([{"kind": "garbled_content"}])
    garbled = complete(server, [{"role": "user", "content": MC_PROMPT}]).choices[0].message.content
    assert garbled != clean
    assert not any(tag in garbled for tag in ("<Human>", "<Assistant>", "<Options>"))


def test_truncated_content_is_half_the_reply(server):
    clean = complete(server, [{"role": "user", "content": QA_PROMPT}]).choices[0].message.content
    server.set_faults([{"kind": "truncated_content"}])
    cut = complete(server, [{"role": "user", "content": QA_PROMPT}])
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == clean[: len(clean) // 2]


def test_per_fingerprint_rule_hits_the_first_attempts_of_each_request(server):
    server.set_faults([{"kind": "500", "times": 2, "per_fingerprint": True}])
    for n in range(3):
        messages = caption_messages(f"image {n}".encode())
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                complete(server, messages)
        assert complete(server, messages).choices[0].message.content
    stats = server.stats()
    assert stats["fault_counts"] == {"500": 6}
    assert sorted(stats["fingerprint_counts"].values()) == [3, 3, 3]


def test_rules_apply_in_order_and_match_filters(server):
    server.set_faults(
        [
            {"kind": "400", "match": "<Options>", "times": None},
            {"kind": "503", "times": 1, "retry_after_s": 0.5},
        ]
    )
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            complete(server, [{"role": "user", "content": MC_PROMPT}])
    with pytest.raises(openai.InternalServerError) as info:
        complete(server, [{"role": "user", "content": QA_PROMPT}])
    assert info.value.response.headers["retry-after"] == "0.5"
    assert complete(server, [{"role": "user", "content": QA_PROMPT}]).choices[0].message.content
    assert [f["rule"] for f in server.stats()["faults_injected"]] == [0, 0, 1]


def test_control_api_over_http(server):
    assert control(server, "/_faults", {"faults": [{"kind": "500"}], "latency_s": 0.0}) == {
        "ok": True,
        "faults": 1,
        "latency_s": 0.0,
    }
    with pytest.raises(openai.InternalServerError):
        complete(server, caption_messages())
    stats = control(server, "/_stats")
    assert stats["total_requests"] == 1 and stats["fault_counts"] == {"500": 1}
    assert stats["fault_plan"][0]["used"] == 1
    assert control(server, "/_reset", {}) == {"ok": True}
    assert control(server, "/_stats")["total_requests"] == 0


def test_reset_restores_the_start_up_plan():
    with OpenAITestServer(faults=[{"kind": "500"}]) as fresh:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                complete(fresh, caption_messages())
            fresh.reset()
        assert fresh.stats()["fault_plan"][0]["used"] == 0


@pytest.mark.parametrize(
    "plan",
    [
        [{"kind": "418"}],
        [{"kind": "500", "times": 0}],
        [{"kind": "429", "retry_after_s": -1}],
        [{"kind": "500", "when": 1}],
        {"faults": "500"},
    ],
)
def test_bad_fault_plans_are_refused(plan):
    with pytest.raises(ValueError):
        parse_fault_plan(plan)


def test_every_fault_kind_is_accepted():
    assert [r.kind for r in parse_fault_plan([{"kind": k} for k in FAULT_KINDS])] == list(FAULT_KINDS)


# --- run modes and load ----------------------------------------------------------------------------


def test_subprocess_mode_writes_its_port_and_outlives_a_killed_client(tmp_path):
    port_file = tmp_path / "port"
    faults = json.dumps([{"kind": "429", "retry_after_s": 0.1}])
    command = [
        sys.executable,
        str(SERVER_FILE),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--faults",
        faults,
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the server never wrote its port file"
            time.sleep(0.02)
        remote = _Remote(f"http://127.0.0.1:{int(port_file.read_text())}")

        # A client killed in the middle of a slow request must not take the server down.
        control(remote, "/_faults", [{"kind": "timeout", "delay_s": 30}])
        client = subprocess.Popen([sys.executable, "-c", _SLOW_CLIENT, remote.base_url + "/chat/completions"])
        deadline = time.monotonic() + 10
        while control(remote, "/_stats")["total_requests"] < 1:
            assert time.monotonic() < deadline, "the client's request never arrived"
            time.sleep(0.02)
        os.kill(client.pid, signal.SIGKILL)
        client.wait(5)

        control(remote, "/_reset", {})  # back to the --faults plan
        with pytest.raises(openai.RateLimitError) as info:
            complete(remote, caption_messages())
        assert info.value.response.headers["retry-after"] == "0.1"
        assert complete(remote, caption_messages()).choices[0].message.content
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            returncode = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        proc.stderr.close()
    assert returncode == 0


_SLOW_CLIENT = (
    "import sys, urllib.request\n"
    'body = b\'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}\'\n'
    "headers = {'Authorization': 'Bearer k', 'Content-Type': 'application/json'}\n"
    "urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=body, headers=headers))\n"
)


class _Remote:
    """Just enough of OpenAITestServer's surface for the helpers above, pointing at a subprocess."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.base_url = url + "/v1"


def test_500_concurrent_requests_through_the_openai_client(server):
    async def run():
        client = client_for(server, timeout=30.0)
        try:
            calls = [
                client.chat.completions.create(model=MODEL, messages=caption_messages(f"image {n}".encode()))
                for n in range(500)
            ]
            return await asyncio.gather(*calls)
        finally:
            await client.close()

    responses = asyncio.run(run())
    assert len({r.choices[0].message.content for r in responses}) == 500
    stats = server.stats()
    assert stats["total_requests"] == 500 and not stats["duplicates"]


def test_512_simultaneous_connections_are_served_in_parallel(server):
    server.set_faults([], latency_s=0.5)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

    async def run():
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, headers={"Authorization": "Bearer k"}
        ) as session:

            async def one(n):
                payload = {**body, "user": str(n)}
                async with session.post(server.base_url + "/chat/completions", json=payload) as response:
                    return response.status

            return await asyncio.gather(*(one(n) for n in range(512)))

    started = time.perf_counter()
    statuses = asyncio.run(run())
    elapsed = time.perf_counter() - started
    assert statuses == [200] * 512
    assert elapsed < 4, f"512 requests with 0.5 s latency took {elapsed:.1f} s: not served concurrently"
