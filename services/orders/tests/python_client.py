"""A client of the orders service in another language (Python, grpcio),
written from the metadata contract alone (README, "The metadata
contract"): no generated code, the messages encoded by hand.

Usage: python_client.py <host:port> <tenant admin token> <another tenant id>
Prints one JSON object: each call's status code, and for the calls that
succeed whether the answer carries the order.
"""

import json
import sys

import grpc


def varint(n):
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def text(field, value):
    data = value.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def number(field, value):
    return varint(field << 3) + varint(value)


def main():
    addr, token, other_tenant = sys.argv[1:4]
    channel = grpc.insecure_channel(addr)
    bearer = [("authorization", "Bearer " + token)]

    def call(method, body, metadata):
        rpc = channel.unary_unary(
            "/example.orders.v1.Orders/" + method,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            answer = rpc(body, metadata=metadata, timeout=10)
            return ["OK", b"py-1" in answer and b"p1" in answer]
        except grpc.RpcError as e:
            return [e.code().name, e.details()]

    traced = bearer + [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    results = {
        "create": call("CreateOrder", text(1, "py-1") + text(2, "p1") + number(3, 2), traced),
        "get": call("GetOrder", text(1, "py-1"), bearer),
        "no_token": call("GetOrder", text(1, "py-1"), []),
        "other_tenant_header": call("GetOrder", text(1, "py-1"), bearer + [("x-tenant-id", other_tenant)]),
        "bad_input": call("GetOrder", text(1, "not an id"), bearer),
    }
    print(json.dumps(results))


main()
