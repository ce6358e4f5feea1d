"""A2A: method names across versions, task ownership, task ids, push URLs, cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from proxy.agent import a2a, a2a_push

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "a2a"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_bytes())


METHODS = [
    ("SendMessage", "SendMessage", "1.0"),
    ("SendStreamingMessage", "SendStreamingMessage", "1.0"),
    ("GetTask", "GetTask", "1.0"),
    ("ListTasks", "ListTasks", "1.0"),
    ("CancelTask", "CancelTask", "1.0"),
    ("SubscribeToTask", "SubscribeToTask", "1.0"),
    ("CreateTaskPushNotificationConfig", "CreateTaskPushNotificationConfig", "1.0"),
    ("SetTaskPushNotificationConfig", "CreateTaskPushNotificationConfig", "1.0"),
    ("GetTaskPushNotificationConfig", "GetTaskPushNotificationConfig", "1.0"),
    ("ListTaskPushNotificationConfigs", "ListTaskPushNotificationConfigs", "1.0"),
    ("ListTaskPushNotificationConfig", "ListTaskPushNotificationConfigs", "1.0"),
    ("DeleteTaskPushNotificationConfig", "DeleteTaskPushNotificationConfig", "1.0"),
    ("GetExtendedAgentCard", "GetExtendedAgentCard", "1.0"),
    ("message/send", "SendMessage", "0.3"),
    ("message/stream", "SendStreamingMessage", "0.3"),
    ("tasks/get", "GetTask", "0.3"),
    ("tasks/list", "ListTasks", "0.3"),
    ("tasks/cancel", "CancelTask", "0.3"),
    ("tasks/resubscribe", "SubscribeToTask", "0.3"),
    ("tasks/pushNotificationConfig/set", "CreateTaskPushNotificationConfig", "0.3"),
    ("tasks/pushNotificationConfig/get", "GetTaskPushNotificationConfig", "0.3"),
    ("tasks/pushNotificationConfig/list", "ListTaskPushNotificationConfigs", "0.3"),
    ("tasks/pushNotificationConfig/delete", "DeleteTaskPushNotificationConfig", "0.3"),
    ("agent/getAuthenticatedExtendedCard", "GetExtendedAgentCard", "0.3"),
]


@pytest.mark.parametrize(("name", "canonical", "version"), METHODS)
def test_normalize_method(name: str, canonical: str, version: str) -> None:
    assert a2a.normalize_method(name) == (canonical, version)


@pytest.mark.parametrize(
    "name", ["", "sendMessage", "sendmessage", "Message/Send", "tasks/send", "tasks/get ", "x"]
)
def test_unknown_methods(name: str) -> None:
    assert a2a.normalize_method(name) is None


# -- task ids --------------------------------------------------------------------------

REQUEST_IDS = [
    ("tasks/get", {"id": "t1", "historyLength": 2}, ["t1"]),
    ("GetTask", {"id": "t1"}, ["t1"]),
    ("tasks/cancel", {"id": "t1"}, ["t1"]),
    ("CancelTask", {"id": "t1"}, ["t1"]),
    ("tasks/resubscribe", {"id": "t1"}, ["t1"]),
    ("SubscribeToTask", {"id": "t1"}, ["t1"]),
    ("tasks/pushNotificationConfig/set",
     {"taskId": "t1", "pushNotificationConfig": {"url": "https://h/x"}}, ["t1"]),
    ("tasks/pushNotificationConfig/get", {"id": "t1", "pushNotificationConfigId": "c"}, ["t1"]),
    ("tasks/pushNotificationConfig/list", {"id": "t1"}, ["t1"]),
    ("tasks/pushNotificationConfig/delete", {"id": "t1", "pushNotificationConfigId": "c"}, ["t1"]),
    ("CreateTaskPushNotificationConfig", {"taskId": "t1", "url": "https://h/x"}, ["t1"]),
    ("GetTaskPushNotificationConfig", {"taskId": "t1", "id": "config-1"}, ["t1"]),
    ("ListTaskPushNotificationConfigs", {"taskId": "t1"}, ["t1"]),
    ("DeleteTaskPushNotificationConfig", {"taskId": "t1", "id": "config-1"}, ["t1"]),
    ("message/send", {"message": {"role": "user", "parts": []}}, []),
    ("message/send", {"message": {"taskId": "t1", "parts": []}}, ["t1"]),
    ("SendMessage", {"message": {"taskId": "t1", "referenceTaskIds": ["t2", "t1"]}}, ["t1", "t2"]),
    ("SendStreamingMessage", {"message": {"referenceTaskIds": ["t9"]}}, ["t9"]),
    ("ListTasks", {"contextId": "c"}, []),
    ("GetExtendedAgentCard", {}, []),
    ("no/such", {"id": "t1"}, []),
]  # fmt: skip


@pytest.mark.parametrize(("method", "params", "ids"), REQUEST_IDS)
def test_task_ids_in_request(method: str, params: dict[str, Any], ids: list[str]) -> None:
    assert a2a.task_ids_in_request(method, params) == ids


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("tasks/get", {}),
        ("GetTask", {"id": 5}),
        ("GetTask", {"id": ""}),
        ("GetTask", None),
        ("GetTaskPushNotificationConfig", {"id": "config-1"}),  # v1.0: the task is taskId
        ("tasks/pushNotificationConfig/get", {"taskId": "t1"}),  # v0.3: the task is id
        ("message/send", {"message": {"taskId": 7}}),
        ("SendMessage", {"message": {"referenceTaskIds": "t1"}}),
        ("SendMessage", {"message": {"referenceTaskIds": [1]}}),
    ],
)
def test_unusable_task_ids(method: str, params: Any) -> None:
    with pytest.raises(a2a.A2aParamsError):
        a2a.task_ids_in_request(method, params)


RESPONSE_IDS = [
    ("send_message_v03_result.json", ["task-v03-1"]),
    ("send_message_v10_result.json", ["task-v10-1"]),
    ("status_update_v03_event.json", ["task-v03-1"]),
    ("status_update_v10_event.json", ["task-v10-1"]),
    ("artifact_update_v10_event.json", ["task-v10-1"]),
]


@pytest.mark.parametrize(("name", "ids"), RESPONSE_IDS)
def test_task_ids_in_response(name: str, ids: list[str]) -> None:
    assert a2a.task_ids_in_response(fixture(name)) == ids


@pytest.mark.parametrize(
    ("response", "ids"),
    [
        ({"result": {"id": "t", "status": {"state": "TASK_STATE_WORKING"}}}, ["t"]),  # GetTask
        ({"result": {"message": {"messageId": "m", "taskId": "t"}}}, ["t"]),
        ({"result": {"kind": "message", "messageId": "m", "taskId": "t"}}, ["t"]),
        ({"result": {"kind": "message", "messageId": "m"}}, []),  # a message, not a task
        ({"result": {"messageId": "m", "id": "not-a-task"}}, []),
        ({"result": {"tasks": [{"id": "a", "status": {}}, {"id": "b", "status": {}}]}}, ["a", "b"]),
        ({"result": None}, []),
        ({"error": {"code": -32001, "message": "Task not found"}}, []),
        ("junk", []),
    ],
)
def test_task_ids_in_response_shapes(response: Any, ids: list[str]) -> None:
    assert a2a.task_ids_in_response(response) == ids


def test_task_not_found() -> None:
    out = json.loads(a2a.task_not_found("r1"))
    assert out == {
        "jsonrpc": "2.0",
        "id": "r1",
        "error": {"code": -32001, "message": "Task not found"},
    }


# -- ownership -------------------------------------------------------------------------

A = "spiffe://payroll.example/agent/payroll"
B = "spiffe://payroll.example/agent/marketing"


def test_ownership_basics() -> None:
    tasks = a2a.TaskOwnership()
    assert not tasks.check("t1", A)  # unknown: not found for everyone
    assert tasks.record("t1", A)
    assert tasks.owner_of("t1") == A
    assert tasks.check("t1", A) and not tasks.check("t1", B)
    assert tasks.record("t1", A)  # idempotent
    assert not tasks.record("t1", B)  # never changes hands
    assert tasks.owner_of("t1") == A
    assert tasks.check_all(["t1"], A) and not tasks.check_all(["t1", "t2"], A)
    tasks.forget("t1")
    assert tasks.owner_of("t1") is None and not tasks.check("t1", A)
    assert not tasks.record("t1", A)  # a forgotten task stays unknown


def test_eviction_fails_closed() -> None:
    tasks = a2a.TaskOwnership(max_tasks=3, max_per_owner=3)
    for i in range(3):
        assert tasks.record(f"a{i}", A)
    assert tasks.check("a0", A)  # a0 is now the most recently used
    assert tasks.record("b0", B)  # evicts the least recently used: a1
    assert len(tasks) == 3
    assert tasks.owner_of("a1") is None
    assert not tasks.check("a1", A) and not tasks.check("a1", B)
    assert not tasks.record("a1", B)  # the evicted id cannot be claimed by anyone
    assert not tasks.record("a1", A)


def test_per_owner_quota_evicts_own_tasks() -> None:
    tasks = a2a.TaskOwnership(max_tasks=100, max_per_owner=2)
    assert tasks.record("a0", A)
    for i in range(10):
        assert tasks.record(f"b{i}", B)
    assert tasks.check("a0", A)  # B's flood only evicted B's own tasks
    assert [t for t in (f"b{i}" for i in range(10)) if tasks.owner_of(t)] == ["b8", "b9"]


def test_tombstones_are_bounded() -> None:
    tasks = a2a.TaskOwnership(max_tasks=1, max_per_owner=1, max_tombstones=2)
    for name in ("t0", "t1", "t2", "t3"):
        assert tasks.record(name, A)
    assert not tasks.record("t2", B)  # still a tombstone
    assert tasks.record("t0", B)  # fell off the bounded tombstone list
    with pytest.raises(ValueError):
        a2a.TaskOwnership(max_tasks=0)


# -- push URLs ----------------------------------------------------------------------------

ALLOWLIST = [
    "https://hooks.payroll.example",
    "https://*.callbacks.example:8443/a2a",
    "http://127.0.0.1:9000/push",
    "https://glob.example/t/*-prod/push",
]

PUSH = [
    ("https://hooks.payroll.example/anything?x=1", True),
    ("https://hooks.payroll.example:443/x", True),
    ("HTTPS://HOOKS.payroll.example/x", True),
    ("https://hooks.payroll.example./x", True),
    ("https://hooks.payroll.example:8443/x", False),
    ("http://hooks.payroll.example/x", False),  # https only unless an entry says http
    ("https://evil.example/x", False),
    ("https://hooks.payroll.example.evil.example/x", False),
    ("https://hooks.payroll.example@evil.example/x", False),
    ("https://user:pw@hooks.payroll.example/x", False),
    ("https://a.callbacks.example:8443/a2a", True),
    ("https://a.b.callbacks.example:8443/a2a/x", True),
    ("https://callbacks.example:8443/a2a", False),  # *.domain is subdomains only
    ("https://a.callbacks.example/a2a", False),  # wrong port
    ("https://a.callbacks.example:8443/a2ab", False),  # not a whole segment
    ("https://a.callbacks.example:8443/other", False),
    ("https://a.callbacks.example:8443/a2a/../admin", False),
    ("https://a.callbacks.example:8443/a2a/%2e%2e/admin", False),
    ("https://a.callbacks.example:8443/a2a%2fadmin", False),
    ("http://127.0.0.1:9000/push", True),
    ("http://127.0.0.1:9000/push/x", True),
    ("http://127.0.0.1:9001/push", False),
    ("https://127.0.0.1:9000/push", False),
    ("ftp://hooks.payroll.example/x", False),
    ("//hooks.payroll.example/x", False),
    ("/relative", False),
    ("", False),
    ("https://hooks.payroll.example/a b", False),
    ("https://hooks.payroll.example/\nx", False),
    ("https://hooks.payroll.exämple/x", False),
    ("https://hooks.payroll.example\\@evil.example/x", False),
    ("https://hooks.payroll.example:99999/x", False),
    ("https:///x", False),
    ("https://glob.example/t/acme-prod/push", True),
    ("https://glob.example/t/-prod/push/x", True),
    ("https://glob.example/t/acme-dev/push", False),
    ("https://glob.example/t/a/b-prod/push", False),  # "*" stays inside one segment
    ("https://glob.example/t/acme-prod", False),
]


@pytest.mark.parametrize(("url", "ok"), PUSH)
def test_push_url_allowed(url: str, ok: bool) -> None:
    assert a2a_push.push_url_allowed(url, ALLOWLIST) is ok


def test_push_allowlist_entries() -> None:
    assert not a2a_push.push_url_allowed("https://hooks.payroll.example/x", [])
    for bad in ("hooks.example", "https://*example.com", "https://a.*.example", "https://h/?q=1",
                "https://u@h", "ftp://h", "https://h/#f"):  # fmt: skip
        with pytest.raises(ValueError):
            a2a_push.validate_push_allowlist_entry(bad)
        assert not a2a_push.push_url_allowed("https://h/x", [bad])
    for good in ALLOWLIST:
        a2a_push.validate_push_allowlist_entry(good)
    assert a2a_push.push_url_allowed("https://[::1]:8443/x", ["https://[::1]:8443"])


PUSH_URLS = [
    ("tasks/pushNotificationConfig/set",
     {"taskId": "t", "pushNotificationConfig": {"url": "https://a/x", "token": "t"}}, ["https://a/x"]),
    ("CreateTaskPushNotificationConfig", {"taskId": "t", "url": "https://b/x"}, ["https://b/x"]),
    ("SetTaskPushNotificationConfig",
     {"parent": "tasks/t", "config": {"pushNotificationConfig": {"url": "https://c/x"}}},
     ["https://c/x"]),
    ("message/send",
     {"message": {"parts": [{"kind": "file", "file": {"uri": "https://files/x"}}]},
      "configuration": {"pushNotificationConfig": {"url": "https://d/x"}}}, ["https://d/x"]),
    ("SendMessage",
     {"message": {"parts": [{"url": "https://files/x"}]},
      "configuration": {"taskPushNotificationConfig": {"url": "https://e/x"}}}, ["https://e/x"]),
    ("SendStreamingMessage", {"message": {"parts": [{"url": "https://files/x"}]}}, []),
    ("CreateTaskPushNotificationConfig", {"taskId": "t", "url": 5}, [""]),
    ("GetTask", {"id": "t", "url": "https://x"}, []),
    ("no/such", {"url": "https://x"}, []),
]  # fmt: skip


@pytest.mark.parametrize(("method", "params", "urls"), PUSH_URLS)
def test_push_urls_in_request(method: str, params: dict[str, Any], urls: list[str]) -> None:
    assert a2a_push.push_urls_in_request(method, params) == urls


# -- agent cards ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("/.well-known/agent-card.json", True),
        ("/.well-known/agent.json", True),
        ("/.well-known/agent-card.json?x=1", True),
        ("/.well-known/agent-card.jsonx", False),
        ("/tenant/.well-known/agent-card.json", False),
        ("/.well-known/", False),
    ],
)
def test_is_agent_card_path(path: str, ok: bool) -> None:
    assert a2a.is_agent_card_path(path) is ok


def test_is_signed_card() -> None:
    assert a2a.is_signed_card((FIXTURES / "agent_card_signed.json").read_bytes())
    assert not a2a.is_signed_card((FIXTURES / "agent_card_unsigned.json").read_bytes())
    not_signed = [
        b'{"signatures":[]}',
        b'{"signatures":{}}',
        b"[]",
        b"junk",
        b"",
        b'{"signatures":[{}],"signatures":[]}',  # duplicate keys: not judged, not "signed"
    ]
    for body in not_signed:
        assert not a2a.is_signed_card(body)
    assert a2a.is_signed_card(b'{"signatures":[1]}')
    assert not a2a.is_signed_card(b'{"signatures":[1]}', max_bytes=5)
