"""The admin API as a client generated from the proto sees it: a Python client made by
grpcio-tools from `proto/skein/admin/v1/admin.proto` creates a key, a team and a budget as
typed messages and reads them back; gRPC server reflection lists and describes the API as
`grpcurl list` / `grpcurl describe` would."""

import importlib
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def admin(tmp_path_factory, admin_target):
    """The generated messages and a stub on the session node."""
    out = tmp_path_factory.mktemp("generated")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "skein/admin/v1/admin.proto",
        ]
    )
    assert code == 0, "grpcio-tools compiles the admin proto"
    sys.path.insert(0, str(out))
    try:
        pb = importlib.import_module("skein.admin.v1.admin_pb2")
        rpc = importlib.import_module("skein.admin.v1.admin_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    channel = grpc.insecure_channel(admin_target)
    yield pb, rpc.AdminStub(channel), channel
    channel.close()


def test_a_generated_client_creates_a_key_a_team_and_a_budget_as_typed_messages(admin):
    pb, stub, _ = admin
    team = stub.Create(
        pb.WriteRequest(
            entity=pb.Entity(team=pb.Team(id="py-team", name="Python team", limits=pb.Limits(rpm=100)))
        )
    )
    assert team.version > 0
    created = stub.CreateKey(pb.CreateKeyRequest(id="py-key", name="from python", team="py-team"))
    assert created.secret.startswith("sk-")
    key = created.key.entity.key
    assert (key.id, key.name, key.team) == ("py-key", "from python", "py-team")
    assert key.prefix and created.secret.startswith(key.prefix.rstrip("…"))
    # The secret's hash is no field of the message: a read never carries it.
    assert "hash" not in pb.VirtualKey.DESCRIPTOR.fields_by_name
    budget = pb.Budget(
        id="py-budget",
        scope=pb.Scope(level=pb.Scope.LEVEL_TEAM, id="py-team"),
        limit_nanos=5_000_000_000,
        period=pb.BudgetPeriod(
            calendar=pb.CalendarPeriod(unit=pb.CalendarPeriod.UNIT_DAY, time_zone="Europe/Paris")
        ),
    )
    written = stub.Create(pb.WriteRequest(entity=pb.Entity(budget=budget)))

    read = stub.Get(pb.GetRequest(kind=pb.KIND_BUDGET, id="py-budget", min_version=written.version))
    stored = read.resource.entity.budget
    assert stored.scope.level == pb.Scope.LEVEL_TEAM and stored.scope.id == "py-team"
    assert stored.limit_nanos == 5_000_000_000
    assert stored.period.calendar.unit == pb.CalendarPeriod.UNIT_DAY
    assert stored.period.calendar.time_zone == "Europe/Paris"
    assert stored.hard, "hard unless said otherwise"
    status = stub.GetBudgetStatus(pb.BudgetStatusRequest(id="py-budget"))
    assert (status.limit_nanos, status.spent_nanos, status.free_nanos) == (5_000_000_000, 0, 5_000_000_000)

    # A typed update replaces the entity; the key keeps its secret.
    key.models.append("gpt-test")
    key.limits.tpm = 5000
    updated = stub.Update(pb.WriteRequest(entity=pb.Entity(key=key)))
    again = stub.Get(pb.GetRequest(kind=pb.KIND_KEY, id="py-key", min_version=updated.version))
    assert list(again.resource.entity.key.models) == ["gpt-test"]
    assert again.resource.entity.key.limits.tpm == 5000
    assert again.resource.entity.key.prefix == key.prefix

    listed = stub.List(pb.ListRequest(kind=pb.KIND_TEAM, min_version=updated.version))
    assert [item.entity.team.id for item in listed.items] == ["py-team"]


def test_a_typed_write_missing_a_field_is_refused_naming_it(admin):
    pb, stub, _ = admin
    with pytest.raises(grpc.RpcError) as refused:
        stub.Create(pb.WriteRequest(entity=pb.Entity(budget=pb.Budget(id="no-scope", limit_nanos=1))))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entity.budget.scope" in refused.value.details()


def test_server_reflection_lists_and_describes_the_admin_api(admin):
    _, _, channel = admin
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert "skein.admin.v1.Admin" in services
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("skein.admin.v1.Admin")
    methods = {method.name for method in service.methods}
    assert {"Create", "CreateKey", "GetBudgetStatus", "ExportConfig"} <= methods
    budget = pool.FindMessageTypeByName("skein.admin.v1.Budget")
    assert {"id", "scope", "limit_nanos", "period", "hard"} <= set(budget.fields_by_name)
