"""The benchmark's counting proxy in front of the real SeaweedFS: an S3 client signing its
requests for the proxy's address works unchanged through it, and every request is
counted once, in its class, with its body bytes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import botocore.session
import pytest
from botocore.config import Config

from bench.s3proxy import Proxy
from devstack.localstack import BUCKET, LocalStack

MiB = 1 << 20


@pytest.fixture
def proxied(local_services: LocalStack) -> Iterator[tuple[Proxy, object]]:
    s3 = local_services.s3
    proxy = Proxy((s3.host, s3.port), ["bench"])
    proxy.start()
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=f"http://127.0.0.1:{proxy.ports['bench']}", region_name=s3.region,
        aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"}),
    )  # fmt: skip
    yield proxy, client
    client.close()
    proxy.stop()


def test_s3_calls_through_the_proxy_work_and_are_counted_exactly(proxied):
    proxy, s3 = proxied
    prefix = f"t/bench-proxy-{uuid.uuid4().hex[:8]}"
    body = bytes(range(256)) * (12 * 4096)  # 12 MiB: several splices per request
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/a", Body=body)
    assert s3.get_object(Bucket=BUCKET, Key=f"{prefix}/a")["Body"].read() == body
    assert s3.get_object(Bucket=BUCKET, Key=f"{prefix}/a", Range="bytes=10-19")["Body"].read() == body[10:20]
    assert s3.head_object(Bucket=BUCKET, Key=f"{prefix}/a")["ContentLength"] == len(body)
    with pytest.raises(s3.exceptions.ClientError):
        s3.head_object(Bucket=BUCKET, Key=f"{prefix}/missing")
    up = s3.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/m")["UploadId"]
    parts = [s3.upload_part(Bucket=BUCKET, Key=f"{prefix}/m", UploadId=up, PartNumber=n, Body=part)["ETag"]
             for n, part in ((1, body[: 5 * MiB]), (2, body[5 * MiB :]))]  # fmt: skip
    s3.complete_multipart_upload(
        Bucket=BUCKET, Key=f"{prefix}/m", UploadId=up,
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n} for n, e in enumerate(parts, 1)]},
    )  # fmt: skip
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [f"{prefix}/a", f"{prefix}/m"]
    s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/a")
    s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": f"{prefix}/m"}]})

    ops = proxy.counters.snapshot()["bench"]
    requests = {op: c["requests"] for op, c in ops.items()}
    assert requests == {"PUT": 3, "GET": 2, "HEAD": 2, "POST": 2, "LIST": 1, "DELETE": 2}
    # bodies: what was uploaded (and at most a little signing framing), what was downloaded
    assert 2 * len(body) <= ops["PUT"]["bytes_sent"] < 2 * len(body) + 64 * 1024
    assert ops["GET"]["bytes_received"] == len(body) + 10
    assert ops["HEAD"]["errors"] == 1 and ops["HEAD"]["bytes_received"] == 0
    assert sum(c["errors"] for c in ops.values()) == 1
