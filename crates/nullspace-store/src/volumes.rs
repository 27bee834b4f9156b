//! Volumes and their attachments (migrations/0006_volumes.sql). The store
//! holds the per-volume lock: one read-write attachment, or any number of
//! read-only ones, never both. What a volume is on disk and in a guest is
//! the server's (`volumes/`).

use sqlx::Row;

use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRow {
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub size_bytes: i64,
    /// Epoch ms.
    pub created_at: i64,
    /// The machine holding it read-write ('' = none).
    pub rw_holder: String,
    pub ro_count: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRow {
    pub id: String,
    pub volume_id: String,
    pub machine_id: String,
    pub namespace: String,
    /// The machine's spare disk.
    pub slot: i64,
    pub mount_path: String,
    pub read_only: bool,
    /// '' = the volume's root.
    pub subpath: String,
    /// `attached`, `detached`, `error`.
    pub state: String,
    pub last_error: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What an attach found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachOutcome {
    Attached,
    /// Held read-write by this machine (or, for a read-write attach, used
    /// read-only by `ro_count` machines: `holder` empty).
    InUse {
        holder: String,
        ro_count: i64,
    },
    /// The machine has this volume already, or that slot is taken.
    Duplicate,
    /// No such volume (deleted meanwhile).
    Gone,
}

const VCOLS: &str = "id, namespace, name, size_bytes, created_at, rw_holder, ro_count";
const ACOLS: &str = "id, volume_id, machine_id, namespace, slot, mount_path, read_only, subpath, state, last_error, created_at, updated_at";

fn vrow(r: sqlx::any::AnyRow) -> VolumeRow {
    VolumeRow {
        id: r.get(0),
        namespace: r.get(1),
        name: r.get(2),
        size_bytes: r.get(3),
        created_at: r.get(4),
        rw_holder: r.get(5),
        ro_count: r.get(6),
    }
}

fn arow(r: sqlx::any::AnyRow) -> AttachmentRow {
    let ro: i64 = r.get(6);
    AttachmentRow {
        id: r.get(0),
        volume_id: r.get(1),
        machine_id: r.get(2),
        namespace: r.get(3),
        slot: r.get(4),
        mount_path: r.get(5),
        read_only: ro != 0,
        subpath: r.get(7),
        state: r.get(8),
        last_error: r.get(9),
        created_at: r.get(10),
        updated_at: r.get(11),
    }
}

impl Store {
    /// Inserts a volume; false when its namespace has one of that name.
    pub async fn insert_volume(&self, v: &VolumeRow) -> Result<bool> {
        let n = sqlx::query(&format!(
            "INSERT INTO volumes ({VCOLS}) SELECT $1, $2, $3, $4, $5, '', 0
             WHERE NOT EXISTS (SELECT 1 FROM volumes WHERE namespace = $2 AND name = $3)"
        ))
        .bind(&v.id)
        .bind(&v.namespace)
        .bind(&v.name)
        .bind(v.size_bytes)
        .bind(v.created_at)
        .execute(&self.pool)
        .await;
        // Two creates of one name at once: the unique index decides.
        crate::wrote(n)
    }

    /// A namespace's volume by id (another namespace's is `None`).
    pub async fn volume(&self, namespace: &str, id: &str) -> Result<Option<VolumeRow>> {
        Ok(sqlx::query(&format!(
            "SELECT {VCOLS} FROM volumes WHERE id = $1 AND namespace = $2"
        ))
        .bind(id)
        .bind(namespace)
        .fetch_optional(&self.pool)
        .await?
        .map(vrow))
    }

    pub async fn volume_by_name(&self, namespace: &str, name: &str) -> Result<Option<VolumeRow>> {
        Ok(sqlx::query(&format!(
            "SELECT {VCOLS} FROM volumes WHERE namespace = $1 AND name = $2"
        ))
        .bind(namespace)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .map(vrow))
    }

    /// A namespace's volumes, oldest first.
    pub async fn volumes(&self, namespace: &str) -> Result<Vec<VolumeRow>> {
        Ok(sqlx::query(&format!(
            "SELECT {VCOLS} FROM volumes WHERE namespace = $1 ORDER BY created_at, id"
        ))
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(vrow)
        .collect())
    }

    /// Deletes a volume nobody has attached; false when it is attached or
    /// not the namespace's (the caller tells which with [`Store::volume`]).
    pub async fn delete_volume(&self, namespace: &str, id: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "DELETE FROM volumes WHERE id = $1 AND namespace = $2 AND rw_holder = '' AND ro_count = 0
             AND NOT EXISTS (SELECT 1 FROM volume_attachments WHERE volume_id = $1)",
        )
        .bind(id)
        .bind(namespace)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(n.rows_affected() > 0)
    }

    /// Takes the volume's lock for `a` (read-write: no other attachment at
    /// all; read-only: no read-write one) and records the attachment, in
    /// one transaction.
    pub async fn attach_volume(&self, a: &AttachmentRow) -> Result<AttachOutcome> {
        let mut tx = self.begin_write().await?;
        let locked = if a.read_only {
            sqlx::query(
                "UPDATE volumes SET ro_count = ro_count + 1 WHERE id = $1 AND namespace = $2 AND rw_holder = ''",
            )
            .bind(&a.volume_id)
            .bind(&a.namespace)
            .execute(&mut *tx)
            .await?
        } else {
            sqlx::query(
                "UPDATE volumes SET rw_holder = $3 WHERE id = $1 AND namespace = $2 AND rw_holder = '' AND ro_count = 0",
            )
            .bind(&a.volume_id)
            .bind(&a.namespace)
            .bind(&a.machine_id)
            .execute(&mut *tx)
            .await?
        };
        if locked.rows_affected() == 0 {
            let v = sqlx::query(
                "SELECT rw_holder, ro_count FROM volumes WHERE id = $1 AND namespace = $2",
            )
            .bind(&a.volume_id)
            .bind(&a.namespace)
            .fetch_optional(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Ok(match v {
                None => AttachOutcome::Gone,
                Some(r) => AttachOutcome::InUse {
                    holder: r.get(0),
                    ro_count: r.get(1),
                },
            });
        }
        let ins = sqlx::query(&format!(
            "INSERT INTO volume_attachments ({ACOLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&a.id)
        .bind(&a.volume_id)
        .bind(&a.machine_id)
        .bind(&a.namespace)
        .bind(a.slot)
        .bind(&a.mount_path)
        .bind(i64::from(a.read_only))
        .bind(&a.subpath)
        .bind(&a.state)
        .bind(&a.last_error)
        .bind(a.created_at)
        .bind(a.updated_at)
        .execute(&mut *tx)
        .await;
        match ins {
            Ok(_) => {
                tx.commit().await?;
                Ok(AttachOutcome::Attached)
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                tx.rollback().await?;
                Ok(AttachOutcome::Duplicate)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes an attachment and releases its part of the volume's lock;
    /// false when it was gone already.
    pub async fn detach_volume(&self, attachment_id: &str) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let Some(a) = sqlx::query(&format!(
            "SELECT {ACOLS} FROM volume_attachments WHERE id = $1"
        ))
        .bind(attachment_id)
        .fetch_optional(&mut *tx)
        .await?
        .map(arow) else {
            tx.rollback().await?;
            return Ok(false);
        };
        sqlx::query("DELETE FROM volume_attachments WHERE id = $1")
            .bind(attachment_id)
            .execute(&mut *tx)
            .await?;
        let release = if a.read_only {
            "UPDATE volumes SET ro_count = ro_count - 1 WHERE id = $1 AND ro_count > 0"
        } else {
            "UPDATE volumes SET rw_holder = '' WHERE id = $1 AND rw_holder = $2"
        };
        sqlx::query(release)
            .bind(&a.volume_id)
            .bind(&a.machine_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn volume_attachment(&self, id: &str) -> Result<Option<AttachmentRow>> {
        Ok(sqlx::query(&format!(
            "SELECT {ACOLS} FROM volume_attachments WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(arow))
    }

    /// Attachments of a volume, or of a machine (`by_machine`), by slot.
    pub async fn volume_attachments(
        &self,
        id: &str,
        by_machine: bool,
    ) -> Result<Vec<AttachmentRow>> {
        let col = if by_machine {
            "machine_id"
        } else {
            "volume_id"
        };
        Ok(sqlx::query(&format!(
            "SELECT {ACOLS} FROM volume_attachments WHERE {col} = $1 ORDER BY slot, created_at, id"
        ))
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(arow)
        .collect())
    }

    /// Records what the guest said about an attachment.
    pub async fn set_attachment_state(
        &self,
        id: &str,
        state: &str,
        last_error: &str,
        at: i64,
    ) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE volume_attachments SET state = $2, last_error = $3, updated_at = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(state)
        .bind(last_error)
        .bind(at)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }
}

impl Store {
    /// Takes a volume for the server's own use as `holder` (`Volume.files`
    /// without a machine): a writer like a read-write attachment, a reader
    /// like a read-only one. [`Store::unlock_volume`] gives it back.
    pub async fn lock_volume(
        &self,
        namespace: &str,
        id: &str,
        holder: &str,
        write: bool,
    ) -> Result<AttachOutcome> {
        let mut tx = self.begin_write().await?;
        let n = if write {
            sqlx::query(
                "UPDATE volumes SET rw_holder = $3 WHERE id = $1 AND namespace = $2 AND rw_holder = '' AND ro_count = 0",
            )
            .bind(id)
            .bind(namespace)
            .bind(holder)
            .execute(&mut *tx)
            .await?
        } else {
            sqlx::query(
                "UPDATE volumes SET ro_count = ro_count + 1 WHERE id = $1 AND namespace = $2 AND rw_holder = ''",
            )
            .bind(id)
            .bind(namespace)
            .execute(&mut *tx)
            .await?
        };
        if n.rows_affected() > 0 {
            tx.commit().await?;
            return Ok(AttachOutcome::Attached);
        }
        let v =
            sqlx::query("SELECT rw_holder, ro_count FROM volumes WHERE id = $1 AND namespace = $2")
                .bind(id)
                .bind(namespace)
                .fetch_optional(&mut *tx)
                .await?;
        tx.rollback().await?;
        Ok(match v {
            None => AttachOutcome::Gone,
            Some(r) => AttachOutcome::InUse {
                holder: r.get(0),
                ro_count: r.get(1),
            },
        })
    }

    pub async fn unlock_volume(&self, id: &str, holder: &str, write: bool) -> Result<()> {
        let q = if write {
            "UPDATE volumes SET rw_holder = '' WHERE id = $1 AND rw_holder = $2"
        } else {
            "UPDATE volumes SET ro_count = ro_count - 1 WHERE id = $1 AND ro_count > 0 AND $2 = $2"
        };
        sqlx::query(q)
            .bind(id)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Drops the server's own holds left by a process that died in the
    /// middle of a file operation (at start-up, before serving).
    pub async fn release_host_volume_locks(&self, holder: &str) -> Result<u64> {
        Ok(
            sqlx::query("UPDATE volumes SET rw_holder = '' WHERE rw_holder = $1")
                .bind(holder)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
