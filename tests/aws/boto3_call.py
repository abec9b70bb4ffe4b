"""Calls an IVS Chat operation through boto3 and prints what happened as one JSON line, for tests/aws_cli.rs.

Usage: boto3_call.py ENDPOINT REQUEST_JSON [--unsigned] [--operation NAME] [--header NAME=VALUE ...]
NAME is the client method (default create_chat_token; send_event, delete_message, …). Credentials, region and
retry settings come from the environment, as for any boto3 program. Each --header is added to the request
by an event hook before it is signed (how an application forwards its end user's identity token,
x-end-user-token, through an AWS SDK).
"""

import json
import sys

import boto3
import botocore
from botocore.config import Config

endpoint, request = sys.argv[1], json.loads(sys.argv[2])
options = sys.argv[3:]
unsigned = "--unsigned" in options
operation = options[options.index("--operation") + 1] if "--operation" in options else "create_chat_token"
headers = [options[i + 1].split("=", 1) for i, o in enumerate(options) if o == "--header"]
config = Config(signature_version=botocore.UNSIGNED) if unsigned else Config()
client = boto3.client("ivschat", endpoint_url=endpoint, config=config)


def add_headers(request, **_):
    for name, value in headers:
        request.headers[name] = value


client.meta.events.register("before-sign.ivschat.CreateChatToken", add_headers)
try:
    response = getattr(client, operation)(**request)
    if operation == "create_chat_token":
        print(json.dumps({
            "token": response["token"],
            "tokenExpirationTime": response["tokenExpirationTime"].isoformat(),
            "sessionExpirationTime": response["sessionExpirationTime"].isoformat(),
            "requestId": response["ResponseMetadata"]["RequestId"],
        }))
    else:
        metadata = response.pop("ResponseMetadata")
        print(json.dumps({**response, "requestId": metadata["RequestId"]}))
except client.exceptions.ValidationException as e:
    print(json.dumps({"exception": "ValidationException", "error": e.response["Error"],
                      "reason": e.response.get("reason"), "fieldList": e.response.get("fieldList"),
                      "requestId": e.response["ResponseMetadata"]["RequestId"]}))
except botocore.exceptions.ClientError as e:
    # Typed exceptions (AccessDeniedException, ThrottlingException, …) are ClientError subclasses.
    metadata = e.response["ResponseMetadata"]
    print(json.dumps({"exception": type(e).__name__, "error": e.response["Error"],
                      "status": metadata["HTTPStatusCode"], "retryAttempts": metadata["RetryAttempts"],
                      "retryAfter": metadata["HTTPHeaders"].get("retry-after"),
                      "requestId": metadata["RequestId"]}))
