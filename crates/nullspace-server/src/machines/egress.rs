//! Machines' egress policies: what a create asks for (`network.egress`,
//! or the legacy `network.allow_out` / `deny_out`), the policy a machine
//! runs under, and `PATCH …/egress`. The rules themselves are
//! `nullspace_vm::net` (enforced) and `nullspace_model::machine::egress`
//! (what a policy means).
//!
//! `internet_access: false` is `deny_all` for the machine's whole life:
//! no policy may weaken it. A policy survives pause and resume (it is in
//! the record) and a fork's child starts with its parent's.

use super::record::{self, Machine};
use super::{MachineError, MachineResult};
use crate::machine_model::{CreateMachineBody, MachineStatus};
use crate::state::Shared;
use nullspace_model::machine::egress::{Egress, EgressMode, EgressPolicy};
use nullspace_store::Caller;
use nullspace_vm::snapshot::VmMeta;
use serde_json::Value;

fn strings(n: &Value, key: &str) -> MachineResult<Vec<String>> {
    match n.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            MachineError::Invalid(format!("network.{key}: a list of IPv4 CIDR strings"))
        }),
    }
}

/// The policy a create asks for (`None`: nothing asked), checked.
pub fn requested(b: &CreateMachineBody) -> MachineResult<Option<EgressPolicy>> {
    let Some(n) = b.network.as_ref().filter(|n| !n.is_null()) else {
        return Ok(None);
    };
    let typed = match n.get("egress") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<EgressPolicy>(v.clone())
                .map_err(|e| MachineError::Invalid(format!("network.egress: {e}")))?,
        ),
    };
    let (allow, deny) = (strings(n, "allow_out")?, strings(n, "deny_out")?);
    let legacy = (!allow.is_empty() || !deny.is_empty()).then(|| EgressPolicy::legacy(allow, deny));
    let p = match (typed, legacy) {
        // deny_all is fail-closed: other fields do not weaken it.
        (Some(t), _) if t.mode == EgressMode::DenyAll => Some(t),
        (Some(_), Some(_)) => {
            return Err(MachineError::Invalid(
                "network: give egress or the legacy allow_out/deny_out, not both".into(),
            ));
        }
        (t, l) => t.or(l),
    };
    if let Some(p) = &p {
        p.check()
            .map_err(|e| MachineError::Invalid(format!("network.{e}")))?;
    }
    Ok(p)
}

/// What a machine of this record runs under.
pub fn effective(internet_access: bool, policy: Option<&EgressPolicy>) -> Egress {
    if !internet_access {
        return Egress::deny_all();
    }
    policy
        .and_then(|p| p.check().ok())
        .unwrap_or_else(|| EgressPolicy::allow_all().check().expect("allow_all"))
}

/// A policy asked of a server that has no machine network namespaces.
fn no_namespaces() -> MachineError {
    MachineError::NotImplemented(
        "egress policies need machine network namespaces, which this server could not set up (it runs them as root with ip and nft; see its start-up log)".into(),
    )
}

/// Whether a create of a machine with this network can be served here:
/// a policy needs namespaces (and a template with a NIC); without
/// namespaces a template built with network cannot be cut off.
pub fn admit(
    state: &Shared,
    template: &str,
    vm: &VmMeta,
    internet: bool,
    policy: Option<&EgressPolicy>,
) -> MachineResult<()> {
    let restricted = policy.is_some_and(|p| p.mode != EgressMode::AllowAll);
    if state.machines.net().is_none() {
        if restricted {
            return Err(no_namespaces());
        }
        if !internet && vm.network {
            return Err(MachineError::NotImplemented(format!(
                "internet_access false: template {template:?} was built with a network device (--build-vm-network), which its machines keep on a server without machine network namespaces"
            )));
        }
        return Ok(());
    }
    if (restricted || policy.is_some()) && !vm.has_nic() {
        return Err(MachineError::conflict(
            "rebuild_required",
            format!(
                "template {template:?} has no network device (built before machines had one); rebuild it to give its machines an egress policy"
            ),
        ));
    }
    Ok(())
}

/// `PATCH …/egress`: replaces a machine's policy. A running machine's
/// table changes before the answer (one transaction; established
/// connections follow it); a paused one gets it at resume.
pub async fn update(
    state: &Shared,
    c: &Caller,
    id: &str,
    policy: EgressPolicy,
) -> MachineResult<EgressPolicy> {
    policy
        .check()
        .map_err(|e| MachineError::Invalid(e.to_string()))?;
    let mut m: Machine = record::load_live(state, c, id).await?;
    if !m.doc.internet_access {
        return Err(MachineError::conflict(
            "machine_conflict",
            format!(
                "machine {id} was created with internet_access false: its egress stays deny_all"
            ),
        ));
    }
    if state.machines.net().is_none() {
        return Err(no_namespaces());
    }
    let status = m.status();
    match status {
        MachineStatus::Running | MachineStatus::Paused => {}
        s => return Err(MachineError::not_ready(id, format!("is {s}"))),
    }
    if status == MachineStatus::Running {
        let live = state
            .machines
            .get(id)
            .ok_or_else(|| MachineError::not_ready(id, "has no VM attached to this server"))?;
        let _l = live.lifecycle.lock().await;
        state
            .machines
            .apply_egress(id, effective(true, Some(&policy)))
            .await
            .map_err(|e| MachineError::runtime(id, e))?;
    }
    m.doc.egress = Some(policy.clone());
    if !record::save(state, &mut m, &[status]).await? {
        return Err(MachineError::InTransition {
            id: id.to_string(),
            why: "changed state while its egress policy changed; send it again".into(),
        });
    }
    Ok(policy)
}
