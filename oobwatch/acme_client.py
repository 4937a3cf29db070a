"""One ACME order for `<zone>` and `*.<zone>`, proved with DNS-01 by the node's own DNS listener.

The protocol is the `acme` library's; here are only the choices: an account
key kept by the caller (so every node and every renewal is one account), a
fresh P-256 key per certificate, and the DNS-01 answers handed to `publish`
(which makes every node's DNS listener serve them) before the server is told
to look.
"""

import datetime
import time
from collections.abc import Callable
from pathlib import Path

from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import jwk

USER_AGENT = "oobwatch"
ORDER_SECONDS = 180
REQUEST_SECONDS = 30


class OrderFailed(Exception):
    """The ACME server refused or could not validate the order; the message says why."""


def account_key() -> bytes:
    """A new ACME account key, as PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def order(
    directory: str,
    zone: str,
    account_pem: bytes,
    publish: Callable[[list[str]], None],
    *,
    email: str = "",
    ca_bundle: Path | None = None,
    settle_seconds: float = 0.0,
) -> bytes:
    """Order a certificate for `zone` and `*.zone`; its key and full chain as PEM.

    `publish` is given the DNS-01 answers to serve at `_acme-challenge.<zone>`; the
    server is asked to validate `settle_seconds` later. Raises OrderFailed.
    """
    loaded = serialization.load_pem_private_key(account_pem, password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    key = jwk.JWKRSA(key=loaded)
    # requests takes a CA bundle's path where acme's type says a bool.
    verify: bool = str(ca_bundle) if ca_bundle else True  # type: ignore[assignment]
    network = client.ClientNetwork(
        key, user_agent=USER_AGENT, verify_ssl=verify, timeout=REQUEST_SECONDS
    )
    try:
        acme = client.ClientV2(client.ClientV2.get_directory(directory, network), network)
        _register(acme, email)
        certificate_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        csr = crypto_util.make_csr(certificate_key, [zone, f"*.{zone}"])
        pending = acme.new_order(csr)
        # Authorizations the account proved lately are valid already: only the others are asked.
        unproved = [
            authorization
            for authorization in pending.authorizations
            if authorization.body.status != messages.STATUS_VALID
        ]
        answers = [_dns01(authorization) for authorization in unproved]
        if answers:
            publish([challenge.validation(key) for challenge in answers])
            if settle_seconds:
                time.sleep(settle_seconds)
        for authorization, challenge in zip(unproved, answers, strict=True):
            acme.answer_challenge(_find(authorization, challenge), challenge.response(key))
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_SECONDS)
        done = acme.poll_and_finalize(pending, deadline)
    except errors.ValidationError as error:
        raise OrderFailed(f"validation failed: {_problems(error)}") from None
    except (errors.Error, messages.Error) as error:
        raise OrderFailed(str(error)) from None
    except OSError as error:
        raise OrderFailed(f"cannot reach {directory}: {error}") from None
    return certificate_key + done.fullchain_pem.encode()


def _register(acme: client.ClientV2, email: str) -> None:
    registration = messages.NewRegistration.from_data(
        email=email or None, terms_of_service_agreed=True
    )
    try:
        acme.new_account(registration)
    except errors.ConflictError as existing:
        # The account exists (an earlier order, another node): use it.
        acme.query_registration(
            messages.RegistrationResource(uri=existing.location, body=messages.Registration())
        )


def _dns01(authorization: messages.AuthorizationResource) -> challenges.DNS01:
    for body in authorization.body.challenges:
        if isinstance(body.chall, challenges.DNS01):
            return body.chall
    name = authorization.body.identifier.value
    raise OrderFailed(f"the ACME server offers no dns-01 challenge for {name}")


def _find(
    authorization: messages.AuthorizationResource, challenge: challenges.DNS01
) -> messages.ChallengeBody:
    return next(body for body in authorization.body.challenges if body.chall is challenge)


def _problems(error: errors.ValidationError) -> str:
    found = []
    for authorization in error.failed_authzrs:
        for body in authorization.body.challenges:
            if body.error is not None:
                found.append(f"{authorization.body.identifier.value}: {body.error}")
    return "; ".join(found) or str(error)
