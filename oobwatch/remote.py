"""Operations on a remote node, through its admin API with a bearer token.

The same `Operations` as on this host: the API answers with the views
`LocalOperations` returns there, parsed back into the same models here.
"""

from collections.abc import Iterator
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from oobwatch.operations import Invalid, NotFound, RemoteFailed
from oobwatch.views import (
    ActorRequest,
    AlertView,
    Bundle,
    CanaryView,
    ChecksView,
    EventView,
    Filters,
    HeadView,
    HealthView,
    IncidentView,
    LoginLink,
    MintRequest,
    NewToken,
    OverviewView,
    PlantRequest,
    Retired,
    Revoked,
    SandboxView,
    Settled,
    TlsView,
    TokenRequest,
    TokenView,
    VerifyView,
)

TIMEOUT_SECONDS = 60.0
# As long as `oobwatch.certs.RENEW_WAIT_SECONDS`, without importing the ACME client for it.
RENEW_WAIT_SECONDS = 300.0
T = TypeVar("T")


class RemoteOperations:
    """Calls one node's admin API."""

    def __init__(self, url: str, token: str) -> None:
        self._client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=TIMEOUT_SECONDS,
        )

    def close(self) -> None:
        self._client.close()

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise RemoteFailed(f"cannot reach the API: {error}") from None
        if response.status_code < 400:
            return response
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        if response.status_code == 404:
            raise NotFound(str(detail))
        if response.status_code == 422:
            raise Invalid(str(detail))
        raise RemoteFailed(f"API answered {response.status_code}: {detail}")

    def _get(self, shape: type[T], method: str, path: str, **kwargs: Any) -> T:
        return TypeAdapter(shape).validate_json(self.call(method, path, **kwargs).content)

    @staticmethod
    def _body(request: BaseModel) -> dict[str, Any]:
        return request.model_dump(mode="json")

    def health(self) -> HealthView:
        return self._get(HealthView, "GET", "/health")

    def canaries(self, sandbox: str | None = None, kind: str | None = None) -> list[CanaryView]:
        params = {k: v for k, v in (("sandbox", sandbox), ("kind", kind)) if v is not None}
        return self._get(list[CanaryView], "GET", "/canaries", params=params)

    def mint(self, request: MintRequest) -> CanaryView:
        return self._get(CanaryView, "POST", "/canaries", json=self._body(request))

    def retire(self, canary_id: str, request: ActorRequest) -> Retired:
        return self._get(Retired, "POST", f"/canaries/{canary_id}/retire")

    def plant(self, request: PlantRequest) -> Bundle:
        return self._get(Bundle, "POST", "/plant", json=self._body(request))

    def timeline(self, filters: Filters) -> list[EventView]:
        return self._get(list[EventView], "GET", "/timeline", params=filters.params())

    def timeline_chunks(self, filters: Filters) -> Iterator[list[EventView]]:
        yield self.timeline(filters)

    def incidents(self, filters: Filters) -> list[IncidentView]:
        return self._get(list[IncidentView], "GET", "/incidents", params=filters.params())

    def incident(self, incident_id: str) -> IncidentView:
        return self._get(IncidentView, "GET", f"/incidents/{incident_id}")

    def alerts(self, open_only: bool = False) -> list[AlertView]:
        return self._get(list[AlertView], "GET", "/alerts", params={"open": open_only})

    def ack(self, alert_id: str, request: ActorRequest) -> Settled:
        return self._get(Settled, "POST", f"/alerts/{alert_id}/ack", json=self._body(request))

    def resolve(self, alert_id: str, request: ActorRequest) -> Settled:
        return self._get(Settled, "POST", f"/alerts/{alert_id}/resolve", json=self._body(request))

    def head(self) -> HeadView:
        return self._get(HeadView, "GET", "/ledger/head")

    def verify(self) -> VerifyView:
        return self._get(VerifyView, "POST", "/ledger/verify")

    def anchor(self) -> HeadView:
        return self._get(HeadView, "POST", "/ledger/anchor")

    def tls(self) -> TlsView:
        return self._get(TlsView, "GET", "/tls")

    def renew_tls(self) -> TlsView:
        # The node answers once its order has ended: an ACME server may take minutes.
        return self._get(TlsView, "POST", "/tls/renew", timeout=RENEW_WAIT_SECONDS + 30)

    def tokens(self) -> list[TokenView]:
        return self._get(list[TokenView], "GET", "/tokens")

    def create_token(self, request: TokenRequest) -> NewToken:
        return self._get(NewToken, "POST", "/tokens", json=self._body(request))

    def revoke_token(self, token_id: str) -> Revoked:
        return self._get(Revoked, "POST", f"/tokens/{token_id}/revoke")

    def rotate_token(self, token_id: str) -> NewToken:
        return self._get(NewToken, "POST", f"/tokens/{token_id}/rotate")

    def overview(self) -> OverviewView:
        return self._get(OverviewView, "GET", "/overview")

    def sandboxes(self) -> list[SandboxView]:
        return self._get(list[SandboxView], "GET", "/sandboxes")

    def checks(self) -> ChecksView:
        return self._get(ChecksView, "GET", "/ledger/checks")

    def ledger_export(self) -> Iterator[str]:
        for line in self.call("GET", "/ledger/export").iter_lines():
            yield line + "\n"

    def login_link(self, token_id: str) -> LoginLink:
        return self._get(LoginLink, "POST", f"/tokens/{token_id}/login-link")
