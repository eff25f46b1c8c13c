"""sidecar.store.classify: one reading of backend errors, for the store's calls and the check."""

import asyncio

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from sidecar.errors import AccessDenied, BackendTimeout, BackendUnavailable, NoCredentials, NotFound, ObjectChanged
from sidecar.preflight import classify
from sidecar.store.classify import domain_error, reason_of


def client_error(code, status=400):
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def wrapped(outer, inner):
    try:
        try:
            raise inner
        except Exception as e:
            raise outer from e
    except Exception as e:
        return e


@pytest.mark.parametrize("exc, reason, error", [
    (client_error("NoSuchKey", 404), "not_found", NotFound),
    (client_error("PreconditionFailed", 412), "object_changed", ObjectChanged),
    (client_error("AccessDenied", 403), "access_denied", AccessDenied),
    (client_error("SignatureDoesNotMatch", 403), "credentials_invalid", AccessDenied),
    (NoCredentialsError(), "credentials_missing", NoCredentials),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "endpoint_unreachable", BackendUnavailable),
    (asyncio.TimeoutError(), "timeout", BackendTimeout),
    (wrapped(FileNotFoundError("b"), client_error("NoSuchBucket", 404)), "bucket_not_found", NotFound),
    (wrapped(PermissionError("b"), client_error("InvalidAccessKeyId", 403)), "credentials_invalid", AccessDenied),
    (ConnectionResetError(), "endpoint_unreachable", BackendUnavailable),
])
def test_the_store_and_the_check_read_an_error_alike(exc, reason, error):
    assert reason_of(exc) == reason
    err = domain_error(exc, "read k")
    assert type(err) is error and "k" in str(err)


def test_the_check_names_its_reason_without_the_request():
    result = classify(wrapped(FileNotFoundError("b"), client_error("NoSuchBucket", 404)), "giab")
    assert (result.code, result.reason) == ("bucket_not_found", "the bucket of storage 'giab' does not exist")
    result = classify(client_error("SignatureDoesNotMatch", 403), "giab")
    assert (result.code, result.reason) == ("credentials_invalid", "the credentials for storage 'giab' were refused (SignatureDoesNotMatch)")


def test_a_programming_error_is_not_taken_for_a_backend_one():
    with pytest.raises(TypeError, match="bad argument"):
        domain_error(TypeError("bad argument"), "read k")
    assert classify(TypeError("x"), "giab").reason == "storage 'giab' failed its check (TypeError)"
