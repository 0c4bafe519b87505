"""Use cases of the patient service: who may do what to a patient, what PHI they see, what is audited.

Every method checks the caller against the organization named in the request before it looks
anything up, so a caller who may not act there learns nothing, not even whether a patient exists
(PERMISSION_DENIED before NOT_FOUND). PHI goes only to clinicians of the patient's organization
and to the patient; everyone else allowed to see the record gets it with PHI cleared and
`phi_withheld` set. Every answer that carries PHI, and every change, is audited with the names of
the PHI fields involved, never their values.
"""

from __future__ import annotations

from dataclasses import dataclass

from medmesh.runtime.audit import AuditTrail, audit
from medmesh.runtime.auth import ALL_ORGANIZATIONS, Principal, Role, current_principal
from medmesh.runtime.directories import OrganizationDirectory, require_existing_organization
from medmesh.runtime.errors import NotFound, PermissionDenied
from medmesh.runtime.filtering import Condition, Converter
from medmesh.runtime.resources import (
    ResourceStore,
    check_etag,
    delete_checked,
    list_page,
    now,
    replace_checked,
    resolve_update_mask,
)
from services.patient.domain import (
    DEVICE_PATTERN,
    UPDATABLE_FIELDS,
    Patient,
    PatientDetails,
    new_patient,
    parse_name,
    parse_parent,
    phi_fields_named,
)

CREATE_ROLES = (Role.ORGANIZATION_ADMIN, Role.CLINICIAN)
# A patient may read only their own record; checked on top of the role.
READ_ROLES = (Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR, Role.PLATFORM_ADMIN, Role.PATIENT)
LIST_ROLES = (Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR, Role.PLATFORM_ADMIN)
UPDATE_ROLES = (Role.ORGANIZATION_ADMIN, Role.CLINICIAN, Role.OPERATOR)
# On top of UPDATE_ROLES, for masks that name a PHI field.
PHI_WRITE_ROLES = (Role.CLINICIAN,)
DELETE_ROLES = (Role.ORGANIZATION_ADMIN, Role.CLINICIAN)


def _device_name(written: str) -> str:
    if not DEVICE_PATTERN.match(written):
        raise ValueError("must be a device name like devices/{device}")
    return written


# PHI fields are deliberately absent: nobody may probe PHI through filters.
FILTER_FIELDS: dict[str, tuple[str, Converter]] = {
    "devices": ("devices", _device_name),
}


@dataclass(frozen=True)
class DisclosedPatient:
    """A patient as one caller may see it: when `phi_withheld`, `patient` has every PHI field cleared."""

    patient: Patient
    phi_withheld: bool


@dataclass(frozen=True)
class PatientPage:
    patients: list[DisclosedPatient]
    next_page_token: str


def may_see_phi(principal: Principal, patient: Patient) -> bool:
    """Clinicians of the patient's organization and the patient themselves; nobody else, not even admins."""
    if principal.role is Role.CLINICIAN:
        return principal.organization == patient.organization
    if principal.role is Role.PATIENT:
        return principal.patient == patient.name
    return False


def disclose(principal: Principal, patient: Patient) -> DisclosedPatient:
    if may_see_phi(principal, patient):
        return DisclosedPatient(patient, phi_withheld=False)
    return DisclosedPatient(patient.without_phi(), phi_withheld=True)


def _authorize(principal: Principal, organization: str, resource: str, roles: tuple[Role, ...], action: str) -> None:
    principal.require_access(organization, resource)
    principal.require_role(*roles, action=action)


class PatientService:
    def __init__(self, store: ResourceStore[Patient], organizations: OrganizationDirectory, trail: AuditTrail) -> None:
        self._store = store
        self._organizations = organizations
        self._trail = trail

    async def create(self, parent: str, details: PatientDetails) -> DisclosedPatient:
        organization = parse_parent(parent)
        principal = current_principal()
        _authorize(principal, organization, organization, CREATE_ROLES, "create patients")
        patient = new_patient(organization, details, now())
        await require_existing_organization(self._organizations, organization, "parent")
        await self._store.insert(patient)
        shown = disclose(principal, patient)
        await self._audit(shown, changed=patient.phi_fields_with_values(), description="patient created")
        return shown

    async def get(self, name: str) -> DisclosedPatient:
        organization, patient_id = parse_name(name)
        principal = current_principal()
        _authorize(principal, organization, name, READ_ROLES, "read patients")
        if principal.role is Role.PATIENT and principal.patient != name:
            raise PermissionDenied(
                f"{principal.subject} may read only their own patient record",
                reason="PATIENT_ACCESS_DENIED",
                metadata={"resource": name},
            )
        shown = disclose(principal, await self._find(organization, patient_id))
        await self._audit_read(shown)
        return shown

    async def list_patients(self, parent: str, filter_text: str, page_size: int, page_token: str) -> PatientPage:
        organization = parse_parent(parent, allow_all=True)
        principal = current_principal()
        # `organizations/-` passes require_access only for platform admins (and internal callers).
        _authorize(principal, organization, organization, LIST_ROLES, "list patients")
        scope = [] if organization == ALL_ORGANIZATIONS else [Condition("organization", True, organization)]
        patients, token = await list_page(self._store, filter_text, FILTER_FIELDS, page_size, page_token, scope)
        page = [disclose(principal, patient) for patient in patients]
        for shown in page:
            await self._audit_read(shown)
        return PatientPage(page, token)

    async def update(self, name: str, changes: PatientDetails, mask: list[str], etag: str) -> DisclosedPatient:
        organization, patient_id = parse_name(name, "patient.name")
        principal = current_principal()
        _authorize(principal, organization, name, UPDATE_ROLES, "update patients")
        fields = resolve_update_mask(mask, UPDATABLE_FIELDS, "patient")
        phi_changed = phi_fields_named(fields)
        if phi_changed and principal.role not in PHI_WRITE_ROLES:
            raise PermissionDenied(
                f"role {principal.role} may not change PHI ({', '.join(phi_changed)}); only clinicians may",
                reason="PHI_WRITE_DENIED",
                metadata={"resource": name, "fields": ",".join(phi_changed)},
            )
        current = await self._find(organization, patient_id)
        check_etag(current.id, current.revision, etag)
        updated = await replace_checked(self._store, current.updated(changes, fields, now()), current)
        shown = disclose(principal, updated)
        await self._audit(shown, changed=phi_changed, description="patient updated")
        return shown

    async def delete(self, name: str, etag: str) -> None:
        organization, patient_id = parse_name(name)
        principal = current_principal()
        _authorize(principal, organization, name, DELETE_ROLES, "delete patients")
        current = await self._find(organization, patient_id)
        await delete_checked(self._store, current, etag)
        # The PHI fields that held something are gone with the record.
        await audit(
            self._trail,
            current.organization,
            current.name,
            phi_fields_changed=current.phi_fields_with_values(),
            description="patient deleted",
        )

    async def _find(self, organization: str, patient_id: str) -> Patient:
        patient = await self._store.get(patient_id)
        # Ids are unique across organizations; a record under another organization's name does not exist here.
        if patient is None or patient.organization != organization:
            name = f"{organization}/patients/{patient_id}"
            raise NotFound(f"patient {name!r} does not exist", reason="PATIENT_NOT_FOUND", metadata={"patient": name})
        return patient

    async def _audit_read(self, shown: DisclosedPatient) -> None:
        """One event per patient whose answer carried PHI; none when it was withheld or empty."""
        if not shown.phi_withheld and shown.patient.phi_fields_with_values():
            await self._audit(shown, description="patient read")

    async def _audit(self, shown: DisclosedPatient, *, changed: tuple[str, ...] = (), description: str) -> None:
        read = () if shown.phi_withheld else shown.patient.phi_fields_with_values()
        await audit(
            self._trail,
            shown.patient.organization,
            shown.patient.name,
            phi_fields_read=read,
            phi_fields_changed=changed,
            description=description,
        )
