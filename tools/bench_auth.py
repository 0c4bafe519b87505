"""`make bench-auth`: what authentication, authorization and audit cost per request.

Starts a platform of its own (free ports, temporary state), makes a clinic with a clinician and
an operator, then times over REST through the gateway:
  - login (argon2id password check + ES256 signing),
  - GET of a patient as the clinician (PHI returned: one audit event recorded per read),
  - the same GET as the operator (PHI withheld: no audit event),
  - GET of the JWKS (no token: the gateway and transcoding without authentication).
Prints a table and writes build/bench/auth.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.people import (  # noqa: E402
    client,
    create_member,
    create_organization,
    create_patient,
)
from tests.integration.platform import new_platform  # noqa: E402


def timed(call: Callable[[], httpx.Response], count: int) -> dict[str, float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        reply = call()
        samples.append((time.perf_counter() - started) * 1000)
        assert reply.status_code == 200, reply.text
    samples.sort()
    return {
        "count": count,
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
        "mean_ms": round(statistics.fmean(samples), 2),
    }


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    with tempfile.TemporaryDirectory(prefix="medmesh-bench-auth-") as state:
        platform = new_platform(Path(state))
        platform.up()
        try:
            with client(platform, platform.admin_token()) as admin:
                clinic = create_organization(admin, "Bench clinic")
                org_admin = create_member(platform, admin, clinic, "ROLE_ORGANIZATION_ADMIN")
                clinician = create_member(platform, org_admin.http, clinic, "ROLE_CLINICIAN")
                operator = create_member(platform, org_admin.http, clinic, "ROLE_OPERATOR")
                patient = create_patient(clinician.http, clinic)["name"]
                anonymous = client(platform)
                login = {"password": {"username": operator.username, "password": operator.password}}
                results = {
                    "login": timed(lambda: anonymous.post("/v1/auth:login", json=login), max(20, count // 10)),
                    "get_patient_with_phi_audited": timed(lambda: clinician.http.get(f"/v1/{patient}"), count),
                    "get_patient_phi_withheld": timed(lambda: operator.http.get(f"/v1/{patient}"), count),
                    "get_jwks_unauthenticated": timed(lambda: anonymous.get("/.well-known/jwks.json"), count),
                }
                for member in (org_admin, clinician, operator):
                    member.http.close()
                anonymous.close()
        finally:
            platform.down()
    out = ROOT / "build" / "bench" / "auth.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"{'request':34} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, figures in results.items():
        print(f"{name:34} {figures['count']:>5} {figures['p50_ms']:>8} {figures['p99_ms']:>8} {figures['mean_ms']:>8}")
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
