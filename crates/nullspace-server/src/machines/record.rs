//! A machine's stored record and its checked transitions: loading (owned
//! by the caller's namespace), saving gated on the status it was read in,
//! and the API's view of it.

use nullspace_model::machine::{MachineConfig, MachineInfo, MachineStatus};
use nullspace_store::{Caller, MachineRow, SnapshotRow, now_ms};

use super::error::{MachineError, MachineResult};
use crate::machine_model::{MachineDoc, SnapshotDoc};
use crate::model::iso;
use crate::state::Shared;

/// A machine as stored: the indexed columns (its status among them) and
/// the server's record.
#[derive(Debug, Clone)]
pub struct Machine {
    pub row: MachineRow,
    pub doc: MachineDoc,
}

impl Machine {
    pub fn from_row(row: MachineRow) -> MachineResult<Machine> {
        let doc = serde_json::from_str(&row.record)
            .map_err(|e| MachineError::Internal(format!("machine {}'s record: {e}", row.id)))?;
        Ok(Machine { row, doc })
    }

    pub fn id(&self) -> &str {
        &self.row.id
    }

    pub fn status(&self) -> MachineStatus {
        self.row.status
    }

    /// Moves to `next` if the state machine allows it; returns the status
    /// it left (what a gated save must still find stored).
    pub fn become_(&mut self, next: MachineStatus) -> MachineResult<MachineStatus> {
        let was = self.row.status;
        self.row.status = was.to(next).map_err(|err| MachineError::Illegal {
            id: self.row.id.clone(),
            err,
        })?;
        Ok(was)
    }

    /// Refuses a machine that has ended.
    pub fn not_ended(&self) -> MachineResult<()> {
        if self.status().is_final() {
            return Err(MachineError::Ended {
                id: self.row.id.clone(),
                status: self.status(),
                reason: self.doc.ended_reason.clone(),
            });
        }
        Ok(())
    }

    /// When the server must act next on it (0: never): the timeout or
    /// inactivity deadline while running, the auto-delete while paused.
    fn deadline(&self) -> i64 {
        let doc = &self.doc;
        match self.status() {
            MachineStatus::Running => {
                let mut d = doc.timeout_at.unwrap_or(0);
                if let Some(i) = doc.inactivity_timeout_ms {
                    let idle = doc.last_active_at + i as i64;
                    d = if d == 0 { idle } else { d.min(idle) };
                }
                d
            }
            MachineStatus::Paused => match (doc.auto_delete_after_ms, doc.paused_at) {
                (Some(ms), Some(at)) => at + ms as i64,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// The API's view.
    pub fn info(&self) -> MachineInfo {
        let doc = &self.doc;
        let running = self.status() == MachineStatus::Running;
        let timeout_at = doc.timeout_at.filter(|_| running);
        MachineInfo {
            id: self.row.id.clone(),
            status: self.status(),
            config: MachineConfig {
                vcpus: doc.vcpus,
                memory_mb: doc.memory_mb,
            },
            template: doc.template.clone(),
            created_at: iso(doc.created_at),
            metadata: Some(doc.metadata.clone()),
            started_at: doc.started_at.map(iso),
            timeout_ms: Some(doc.timeout_ms),
            timeout_at: timeout_at.map(iso),
            expires_at: timeout_at.map(iso),
            remaining_ms: timeout_at.map(|t| (t - now_ms()).max(0)),
            timeout_action: Some(doc.timeout_action),
            last_active_at: Some(iso(doc.last_active_at)),
            inactivity_timeout_ms: doc.inactivity_timeout_ms,
            auto_delete_after_ms: doc.auto_delete_after_ms,
            ephemeral: doc.ephemeral,
            cwd: doc.cwd.clone(),
            snapshot_id: doc.snapshot_id.clone(),
            // The owner's to hand out; a public machine needs none.
            traffic_access_token: (!doc.access.public).then(|| doc.access.traffic_token.clone()),
            // Only a create's answer says (`machines::create`).
            warm_pool_checkout: None,
        }
    }
}

pub fn plausible_id(id: &str) -> bool {
    crate::builds::plausible_id(id)
}

/// The caller's machine; anything else is "not found".
pub async fn load(state: &Shared, c: &Caller, id: &str) -> MachineResult<Machine> {
    if !plausible_id(id) {
        return Err(MachineError::NotFound(id.to_string()));
    }
    let row = state
        .store
        .machine(id)
        .await?
        .filter(|r| r.namespace == c.namespace)
        .ok_or_else(|| MachineError::NotFound(id.to_string()))?;
    Machine::from_row(row)
}

/// The caller's machine unless it has ended: an ended machine is gone for
/// every operation but listing and delete (`Machine.connect` of a killed
/// id answers `*_not_found`, as the SDK expects).
pub async fn load_live(state: &Shared, c: &Caller, id: &str) -> MachineResult<Machine> {
    let m = load(state, c, id).await?;
    m.not_ended()?;
    Ok(m)
}

/// Writes the record (and the columns it implies); with `only_if`, only
/// while the stored status is one of those (returns whether it wrote).
pub async fn save(
    state: &Shared,
    m: &mut Machine,
    only_if: &[MachineStatus],
) -> MachineResult<bool> {
    m.row.updated_at = now_ms();
    m.row.deadline_at = m.deadline();
    m.row.record = serde_json::to_string(&m.doc)
        .map_err(|e| MachineError::Internal(format!("machine record: {e}")))?;
    Ok(state.store.update_machine(&m.row, only_if).await?)
}

/// [`Machine::become_`] `next`, then a save gated on the status it left:
/// `false` when another writer changed it first (the caller reads again).
pub async fn transition(
    state: &Shared,
    m: &mut Machine,
    next: MachineStatus,
) -> MachineResult<bool> {
    let was = m.become_(next)?;
    save(state, m, &[was]).await
}

/// The caller's snapshot.
pub async fn load_snapshot(
    state: &Shared,
    c: &Caller,
    id: &str,
) -> MachineResult<(SnapshotRow, SnapshotDoc)> {
    if !plausible_id(id) {
        return Err(MachineError::SnapshotNotFound(id.to_string()));
    }
    let row = state
        .store
        .snapshot(id)
        .await?
        .filter(|r| r.namespace == c.namespace)
        .ok_or_else(|| MachineError::SnapshotNotFound(id.to_string()))?;
    let doc = snapshot_doc(&row)?;
    Ok((row, doc))
}

pub fn snapshot_doc(row: &SnapshotRow) -> MachineResult<SnapshotDoc> {
    serde_json::from_str(&row.record)
        .map_err(|e| MachineError::Internal(format!("snapshot {}'s record: {e}", row.id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine_model::{Flavor, VmRecord};
    use nullspace_model::machine::TimeoutAction;

    fn machine(status: MachineStatus) -> Machine {
        let doc = MachineDoc {
            id: "mch_1".into(),
            flavor: Flavor::Machine,
            template: "t".into(),
            template_id: "tmpl_1".into(),
            build_id: "tb_1".into(),
            vcpus: 1,
            memory_mb: 256,
            created_at: 1_000,
            started_at: Some(1_000),
            timeout_ms: 60_000,
            timeout_action: TimeoutAction::Destroy,
            timeout_at: Some(61_000),
            inactivity_timeout_ms: Some(5_000),
            auto_delete_after_ms: Some(9_000),
            ephemeral: false,
            auto_resume: false,
            last_active_at: 2_000,
            paused_at: Some(3_000),
            metadata: Default::default(),
            env_keys: vec![],
            cwd: None,
            internet_access: true,
            egress: None,
            access: Default::default(),
            base_dir: "artifacts/snap".into(),
            template_dir: "artifacts/snap".into(),
            snapshot_id: None,
            parent_id: None,
            vm: Some(VmRecord { pid: 42 }),
            idempotency_key: None,
            ended_reason: Some("deleted".into()),
            ended_at: None,
        };
        Machine {
            row: MachineRow {
                id: "mch_1".into(),
                namespace: "ns".into(),
                node_id: "node_1".into(),
                status,
                template_id: "tmpl_1".into(),
                base_snapshot: String::new(),
                created_at: 1_000,
                updated_at: 1_000,
                deadline_at: 0,
                record: String::new(),
            },
            doc,
        }
    }

    #[test]
    fn transitions_are_checked_and_report_the_status_left() {
        let mut m = machine(MachineStatus::Creating);
        assert_eq!(
            m.become_(MachineStatus::Running).unwrap(),
            MachineStatus::Creating
        );
        assert_eq!(
            m.become_(MachineStatus::Paused).unwrap(),
            MachineStatus::Running
        );
        // A paused machine is claimed for a resume, which may fail back.
        m.become_(MachineStatus::Creating).unwrap();
        m.become_(MachineStatus::Paused).unwrap();
        m.become_(MachineStatus::Destroyed).unwrap();
        let e = m.become_(MachineStatus::Running).unwrap_err();
        assert!(
            matches!(e, MachineError::Illegal { .. }),
            "a destroyed machine never runs again: {e}"
        );
        assert_eq!(
            m.status(),
            MachineStatus::Destroyed,
            "a refusal changes nothing"
        );
        // Running never goes back to creating.
        let mut r = machine(MachineStatus::Running);
        assert!(r.become_(MachineStatus::Creating).is_err());
    }

    #[test]
    fn deadlines_follow_the_status() {
        // Running: the earlier of the timeout and the inactivity deadline.
        assert_eq!(machine(MachineStatus::Running).deadline(), 7_000);
        // Paused: the auto-delete.
        assert_eq!(machine(MachineStatus::Paused).deadline(), 12_000);
        for s in [
            MachineStatus::Creating,
            MachineStatus::Destroyed,
            MachineStatus::Error,
        ] {
            assert_eq!(machine(s).deadline(), 0, "{s}");
        }
    }

    #[test]
    fn ended_machines_are_refused_with_their_reason() {
        let m = machine(MachineStatus::Destroyed);
        let e = m.not_ended().unwrap_err().to_string();
        assert_eq!(e, "machine mch_1 is destroyed (deleted)");
        assert!(machine(MachineStatus::Paused).not_ended().is_ok());
    }

    #[test]
    fn info_shows_timeouts_only_while_running() {
        let running = machine(MachineStatus::Running).info();
        assert!(running.timeout_at.is_some() && running.remaining_ms.is_some());
        let paused = machine(MachineStatus::Paused).info();
        assert!(paused.timeout_at.is_none() && paused.expires_at.is_none());
        let v = serde_json::to_value(&paused).unwrap();
        assert_eq!(v["status"], "paused");
        assert_eq!(v["timeout_action"], "destroy");
    }

    #[test]
    fn older_records_with_absolute_paths_and_vm_handles_still_load() {
        let mut m = machine(MachineStatus::Running);
        let mut v = serde_json::to_value(&m.doc).unwrap();
        v["vm"] = serde_json::json!({"pid": 7, "dir": "/d/machines/mch_1",
            "agent_socket": "/d/machines/mch_1/agent.sock", "qmp_socket": "/d/machines/mch_1/qmp.sock"});
        v["base_dir"] = "/d/artifacts/snap".into();
        m.row.record = v.to_string();
        let back = Machine::from_row(m.row).unwrap();
        assert_eq!(back.doc.vm, Some(VmRecord { pid: 7 }));
        assert_eq!(back.doc.base_dir, "/d/artifacts/snap");
    }
}
