"""A2A over JSON-RPC: method names, task ownership, push URLs, agent cards (pure).

Theory of operation: A2A v0.3 and v1.0 name the same operations differently
(``message/send`` and ``SendMessage``), and v1.0 drafts used a few names the
release then changed (``SetTaskPushNotificationConfig`` became
``CreateTaskPushNotificationConfig``). :func:`normalize_method` folds every
name we know onto the v1.0 release names, so a policy rule is written once;
a name we do not know is None, which a caller denies (a new operation is
not allowed by accident).

Tasks are the unit of state and their ids are bearer references: whoever
presents one to GetTask, CancelTask, SubscribeToTask or the push-config
operations acts on it. :class:`TaskOwnership` remembers which peer each
task was created for and answers "not found" to anyone else. It is bounded;
an evicted task becomes unknown, which is "not found" for *everyone*, and
its id is remembered as a tombstone so it cannot be claimed again. Each
peer also has its own quota, so one peer creating many tasks evicts its own
oldest tasks, not other peers'.

Push notification URLs make the *server* send requests; without an
allowlist that is a server-side request forgery. :func:`~proxy.agent.a2a_push.push_url_allowed`
is deliberately narrow: https only unless an entry says http, no userinfo,
no dot segments or encoded slashes; globs only as a leading ``*.`` host
label and as ``*`` inside a path segment.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Final

from proxy.agent.jsonrpc import JsonRpcError, JsonRpcId, decode_json, error_response

V0_3: Final = "0.3"
V1_0: Final = "1.0"

SEND_MESSAGE: Final = "SendMessage"
SEND_STREAMING_MESSAGE: Final = "SendStreamingMessage"
GET_TASK: Final = "GetTask"
LIST_TASKS: Final = "ListTasks"
CANCEL_TASK: Final = "CancelTask"
SUBSCRIBE_TO_TASK: Final = "SubscribeToTask"
CREATE_PUSH_CONFIG: Final = "CreateTaskPushNotificationConfig"
GET_PUSH_CONFIG: Final = "GetTaskPushNotificationConfig"
LIST_PUSH_CONFIGS: Final = "ListTaskPushNotificationConfigs"
DELETE_PUSH_CONFIG: Final = "DeleteTaskPushNotificationConfig"
GET_EXTENDED_AGENT_CARD: Final = "GetExtendedAgentCard"

# Wire name -> (canonical name, protocol version). Sources: A2A v1.0 proto
# service A2AService (specification/a2a.proto), "What's new in v1.0"
# (docs/whats-new-v1.md), a2a-python v0.3 types (src/a2a/types.py).
_METHODS: Final[Mapping[str, tuple[str, str]]] = {
    # v1.0 release names (JSON-RPC uses the gRPC method names).
    SEND_MESSAGE: (SEND_MESSAGE, V1_0),
    SEND_STREAMING_MESSAGE: (SEND_STREAMING_MESSAGE, V1_0),
    GET_TASK: (GET_TASK, V1_0),
    LIST_TASKS: (LIST_TASKS, V1_0),
    CANCEL_TASK: (CANCEL_TASK, V1_0),
    SUBSCRIBE_TO_TASK: (SUBSCRIBE_TO_TASK, V1_0),
    CREATE_PUSH_CONFIG: (CREATE_PUSH_CONFIG, V1_0),
    GET_PUSH_CONFIG: (GET_PUSH_CONFIG, V1_0),
    LIST_PUSH_CONFIGS: (LIST_PUSH_CONFIGS, V1_0),
    DELETE_PUSH_CONFIG: (DELETE_PUSH_CONFIG, V1_0),
    GET_EXTENDED_AGENT_CARD: (GET_EXTENDED_AGENT_CARD, V1_0),
    # v1.0 draft names still spoken by some SDKs.
    "SetTaskPushNotificationConfig": (CREATE_PUSH_CONFIG, V1_0),
    "ListTaskPushNotificationConfig": (LIST_PUSH_CONFIGS, V1_0),
    # v0.3 names.
    "message/send": (SEND_MESSAGE, V0_3),
    "message/stream": (SEND_STREAMING_MESSAGE, V0_3),
    "tasks/get": (GET_TASK, V0_3),
    "tasks/cancel": (CANCEL_TASK, V0_3),
    "tasks/resubscribe": (SUBSCRIBE_TO_TASK, V0_3),
    "tasks/pushNotificationConfig/set": (CREATE_PUSH_CONFIG, V0_3),
    "tasks/pushNotificationConfig/get": (GET_PUSH_CONFIG, V0_3),
    "tasks/pushNotificationConfig/list": (LIST_PUSH_CONFIGS, V0_3),
    "tasks/pushNotificationConfig/delete": (DELETE_PUSH_CONFIG, V0_3),
    "agent/getAuthenticatedExtendedCard": (GET_EXTENDED_AGENT_CARD, V0_3),
    # Not in the v0.3 JSON-RPC binding (ListTasks was gRPC/REST there), but
    # v0.3-era servers expose it; it is the same operation.
    "tasks/list": (LIST_TASKS, V0_3),
}

# Operations on one existing task, named in the request.
TASK_SCOPED: Final = frozenset(
    {
        GET_TASK,
        CANCEL_TASK,
        SUBSCRIBE_TO_TASK,
        CREATE_PUSH_CONFIG,
        GET_PUSH_CONFIG,
        LIST_PUSH_CONFIGS,
        DELETE_PUSH_CONFIG,
    }
)
# Operations whose answers create (or continue) tasks for the caller.
TASK_CREATING: Final = frozenset({SEND_MESSAGE, SEND_STREAMING_MESSAGE})

# A2A error codes: identical in v0.3 (a2a-python types.py) and v1.0 (§5.4).
TASK_NOT_FOUND: Final = -32001

AGENT_CARD_PATHS: Final = frozenset(
    {
        "/.well-known/agent-card.json",  # v0.3 and later
        "/.well-known/agent.json",  # before v0.3
    }
)


def normalize_method(name: str) -> tuple[str, str] | None:
    """``(canonical v1.0 name, "0.3" | "1.0")`` for a wire method, or None."""
    return _METHODS.get(name)


class A2aParamsError(ValueError):
    """A task id or push URL field that is there but unusable (deny: -32602)."""


# -- task ids ---------------------------------------------------------------------


def _str_field(obj: Any, name: str) -> str | None:
    """obj[name] if obj is an object carrying it; a present non-string, or an
    empty string, is an error (a server might coerce it: we cannot judge it)."""
    if not isinstance(obj, dict) or name not in obj or obj[name] is None:
        return None
    value = obj[name]
    if not isinstance(value, str) or not value:
        raise A2aParamsError(f"{name} must be a non-empty string")
    return value


def task_ids_in_request(method: str, params: Any) -> list[str]:
    """Every existing task a request names, to check against ownership.

    Task-scoped operations must name exactly one task (A2aParamsError if not).
    SendMessage names one if it continues a task (``message.taskId``), and
    a message may pull others in as context (``referenceTaskIds``).
    """
    normalized = normalize_method(method)
    if normalized is None:
        return []
    canonical, version = normalized
    if canonical in TASK_CREATING:
        message = params.get("message") if isinstance(params, dict) else None
        ids = []
        if (task_id := _str_field(message, "taskId")) is not None:
            ids.append(task_id)
        refs = message.get("referenceTaskIds") if isinstance(message, dict) else None
        if refs is not None:
            if not isinstance(refs, list):
                raise A2aParamsError("referenceTaskIds must be an array")
            for ref in refs:
                if not isinstance(ref, str) or not ref:
                    raise A2aParamsError("referenceTaskIds must hold non-empty strings")
                ids.append(ref)
        return list(dict.fromkeys(ids))
    if canonical not in TASK_SCOPED:
        return []
    # v0.3 push get/list/delete name the task "id" (TaskIdParams and friends);
    # v1.0 push requests name it "taskId" ("id" is the config's id there).
    if canonical in (GET_TASK, CANCEL_TASK, SUBSCRIBE_TO_TASK) or (
        version == V0_3 and canonical != CREATE_PUSH_CONFIG
    ):
        field = "id"
    else:
        field = "taskId"
    task_id = _str_field(params, field)
    if task_id is None:
        raise A2aParamsError(f"{method} needs params.{field}")
    return [task_id]


def task_ids_in_response(obj: Any) -> list[str]:
    """Task ids in a response (or a streamed event), both versions, in order.

    v0.3: the result *is* a Task (``kind: "task"``, ``id``), a Message, or a
    status/artifact update event (``taskId``). v1.0: ``{"task": {...}}``,
    ``{"message": {...}}``, ``{"statusUpdate": {...}}``, ``{"artifactUpdate":
    {...}}``, or a bare Task (GetTask, CancelTask). ListTasks' ``tasks[]`` too:
    a caller must find each one owned by the peer (never record from them).
    """
    result = obj.get("result") if isinstance(obj, dict) else None
    if not isinstance(result, dict):
        return []
    ids: list[str] = []

    def add(value: Any) -> None:
        if isinstance(value, str) and value:
            ids.append(value)

    def task_like(value: Any) -> None:
        if isinstance(value, dict):
            add(value.get("id") if ("status" in value or value.get("kind") == "task") else None)

    task_like(result)
    add(result.get("taskId"))  # v0.3 events and messages
    task_like(result.get("task"))
    for wrapper in ("message", "statusUpdate", "artifactUpdate"):
        inner = result.get(wrapper)
        if isinstance(inner, dict):
            add(inner.get("taskId"))
    tasks = result.get("tasks")
    if isinstance(tasks, list):
        for task in tasks:
            task_like(task)
    return list(dict.fromkeys(ids))


class TaskOwnership:
    """Which peer each task belongs to (bounded; unknown means "not found").

    ``record`` refuses (returns False) a task already owned by someone else
    and a task that was evicted: both fail closed. ``max_per_owner`` evicts a
    peer's own oldest task first, so no peer can push out another's tasks by
    creating many; past ``max_tasks`` the least recently used task goes.
    Tombstones (evicted ids) are bounded too: an id can only come back after
    ``max_tombstones`` further evictions.
    """

    def __init__(
        self,
        max_tasks: int = 100_000,
        max_per_owner: int = 10_000,
        max_tombstones: int | None = None,
    ) -> None:
        if max_tasks < 1 or max_per_owner < 1:
            raise ValueError("TaskOwnership needs room for at least one task")
        self.max_tasks = max_tasks
        self.max_per_owner = max_per_owner
        self.max_tombstones = 4 * max_tasks if max_tombstones is None else max_tombstones
        self._owner: OrderedDict[str, str] = OrderedDict()  # task -> owner, LRU first
        self._by_owner: dict[str, OrderedDict[str, None]] = {}  # owner -> its tasks, oldest first
        self._tombstones: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def record(self, task_id: str, owner: str) -> bool:
        """Remember ``owner`` for ``task_id``; False if that would change hands."""
        current = self._owner.get(task_id)
        if current is not None:
            if current != owner:
                return False
            self._touch(task_id, owner)
            return True
        if task_id in self._tombstones:
            return False
        mine = self._by_owner.setdefault(owner, OrderedDict())
        while len(mine) >= self.max_per_owner:
            self._evict(next(iter(mine)))
        while len(self._owner) >= self.max_tasks:
            self._evict(next(iter(self._owner)))
        mine = self._by_owner.setdefault(owner, OrderedDict())
        self._owner[task_id] = owner
        mine[task_id] = None
        return True

    def owner_of(self, task_id: str) -> str | None:
        return self._owner.get(task_id)

    def check(self, task_id: str, peer: str) -> bool:
        """May ``peer`` act on ``task_id``? Unknown tasks: no one may."""
        owner = self._owner.get(task_id)
        if owner is None or owner != peer:
            return False
        self._touch(task_id, owner)
        return True

    def check_all(self, task_ids: Iterable[str], peer: str) -> bool:
        return all(self.check(task_id, peer) for task_id in task_ids)

    def forget(self, task_id: str) -> None:
        """Drop a task (e.g. the server said it does not exist)."""
        if task_id in self._owner:
            self._evict(task_id)

    def _touch(self, task_id: str, owner: str) -> None:
        self._owner.move_to_end(task_id)
        self._by_owner[owner].move_to_end(task_id)

    def _evict(self, task_id: str) -> None:
        owner = self._owner.pop(task_id)
        mine = self._by_owner[owner]
        del mine[task_id]
        if not mine:
            del self._by_owner[owner]
        self._tombstones[task_id] = None
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)


def task_not_found(id: JsonRpcId | None) -> bytes:
    """TaskNotFoundError (-32001): also the answer for someone else's task,
    so a caller cannot tell "exists but not yours" from "does not exist"."""
    return error_response(id, TASK_NOT_FOUND, "Task not found")


# -- agent cards ----------------------------------------------------------------------


def is_agent_card_path(path: str) -> bool:
    """The well-known agent card paths (query ignored; path already normalised)."""
    return path.split("?", 1)[0] in AGENT_CARD_PATHS


def is_signed_card(body: bytes, *, max_bytes: int = 1 << 20) -> bool:
    """True for a JSON object with a non-empty ``signatures`` array (JWS over
    the card's JCS form): such a card must pass byte for byte. Anything we
    cannot parse strictly is not treated as signed."""
    try:
        card = decode_json(body, max_bytes=max_bytes)
    except JsonRpcError:
        return False
    signatures = card.get("signatures") if isinstance(card, dict) else None
    return isinstance(signatures, list) and len(signatures) > 0
