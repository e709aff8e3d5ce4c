"""One-shot set-up of the AWS emulator for `docker compose --profile dynamodb`:
what the CloudFormation stack (deploy/aws/tenantmesh.yaml) makes in AWS,
made in moto: the services' tables (pk/sk, on-demand, point-in-time
recovery on the durable ones) and the tenant-access role the data service
assumes per tenant. Idempotent: run it again and it changes nothing.

Runs in the moto image (python and boto3 come with it); tests run it too,
against the emulator `cargo xtask setup` installs (tests/e2e/compose_wiring.rs).

Environment: AWS_ENDPOINT_URL (the emulator), AWS_REGION, TENANTMESH_TABLE_PREFIX
(default tenantmesh-), TENANTMESH_STORAGE (must be dynamodb: the services
must be told to use what this makes).
"""

import json
import os
import sys
import time

import boto3
from botocore.exceptions import ClientError, EndpointConnectionError

# Every table a service opens (and whether it holds durable state).
TABLES = {
    "registry": True,
    "auth": True,
    "onboarding": True,
    "leases": False,
    "usage": True,
    "data": True,
    # The example application service's one table (services/orders).
    "orders-orders": True,
}
ROLE = "tenantmesh-tenant-access"


def main() -> int:
    if os.environ.get("TENANTMESH_STORAGE") != "dynamodb":
        print(
            "moto-init: the dynamodb profile needs TENANTMESH_STORAGE=dynamodb too "
            "(TENANTMESH_STORAGE=dynamodb docker compose --profile dynamodb up)",
            file=sys.stderr,
        )
        return 1
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    prefix = os.environ.get("TENANTMESH_TABLE_PREFIX") or "tenantmesh-"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    dynamodb = boto3.client("dynamodb", endpoint_url=endpoint, region_name=region)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=region)
    sts = boto3.client("sts", endpoint_url=endpoint, region_name=region)

    deadline = time.monotonic() + 60
    while True:
        try:
            account = sts.get_caller_identity()["Account"]
            break
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                print(f"moto-init: no emulator at {endpoint}", file=sys.stderr)
                return 1
            time.sleep(0.5)

    for name, durable in TABLES.items():
        table = prefix + name
        try:
            dynamodb.create_table(
                TableName=table,
                BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[
                    {"AttributeName": "pk", "AttributeType": "S"},
                    {"AttributeName": "sk", "AttributeType": "S"},
                ],
                KeySchema=[
                    {"AttributeName": "pk", "KeyType": "HASH"},
                    {"AttributeName": "sk", "KeyType": "RANGE"},
                ],
                Tags=[{"Key": "tenantmesh:component", "Value": name}],
            )
            print(f"moto-init: table {table} created")
        except ClientError as e:
            if e.response["Error"]["Code"] != "ResourceInUseException":
                raise
            print(f"moto-init: table {table} exists")
        dynamodb.get_waiter("table_exists").wait(TableName=table)
        if durable:
            dynamodb.update_continuous_backups(
                TableName=table,
                PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True},
            )

    # The role's trust and ceiling, as in the CloudFormation stack (the
    # emulator evaluates neither; AWS does).
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
                "Condition": {"StringLike": {"sts:RoleSessionName": "tenant-*", "sts:SourceIdentity": "tenant-*"}},
            }
        ],
    }
    items = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": [
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:DeleteItem",
                    "dynamodb:Query",
                    "dynamodb:BatchGetItem",
                    "dynamodb:BatchWriteItem",
                    "dynamodb:ConditionCheckItem",
                ],
                "Resource": [
                    f"arn:aws:dynamodb:{region}:{account}:table/{prefix}data",
                    f"arn:aws:dynamodb:{region}:{account}:table/{prefix}data/index/*",
                    f"arn:aws:dynamodb:{region}:{account}:table/{prefix}tenant-*",
                ],
            }
        ],
    }
    try:
        iam.create_role(
            RoleName=ROLE,
            AssumeRolePolicyDocument=json.dumps(trust),
            Description="Assumed by the tenantmesh data service with a per-tenant session policy.",
            MaxSessionDuration=3600,
        )
        print(f"moto-init: role {ROLE} created")
    except ClientError as e:
        if e.response["Error"]["Code"] != "EntityAlreadyExists":
            raise
        print(f"moto-init: role {ROLE} exists")
    iam.put_role_policy(RoleName=ROLE, PolicyName="tenant-items", PolicyDocument=json.dumps(items))
    print(f"moto-init: ready (account {account}, table prefix {prefix})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
