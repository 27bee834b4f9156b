//! Preview grants (migrations/0005_preview_grants.sql): expiring access to
//! one port of one machine. The store keeps the rows; what a grant allows
//! and how its token is signed is the server's (`machines::ports`).

use sqlx::Row;

use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewGrantRow {
    pub id: String,
    pub namespace: String,
    pub machine_id: String,
    pub port: u16,
    /// `direct` (a signed URL) or `proxy` (a header token for a proxy).
    pub auth_mode: String,
    /// Epoch ms.
    pub issued_at: i64,
    pub expires_at: i64,
    /// Epoch ms; 0 while not revoked.
    pub revoked_at: i64,
}

const COLS: &str = "id, namespace, machine_id, port, auth_mode, issued_at, expires_at, revoked_at";

fn row(r: sqlx::any::AnyRow) -> PreviewGrantRow {
    let port: i64 = r.get(3);
    PreviewGrantRow {
        id: r.get(0),
        namespace: r.get(1),
        machine_id: r.get(2),
        port: u16::try_from(port).unwrap_or(0),
        auth_mode: r.get(4),
        issued_at: r.get(5),
        expires_at: r.get(6),
        revoked_at: r.get(7),
    }
}

impl Store {
    pub async fn insert_preview_grant(&self, g: &PreviewGrantRow) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO preview_grants ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&g.id)
        .bind(&g.namespace)
        .bind(&g.machine_id)
        .bind(i64::from(g.port))
        .bind(&g.auth_mode)
        .bind(g.issued_at)
        .bind(g.expires_at)
        .bind(g.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn preview_grant(&self, id: &str) -> Result<Option<PreviewGrantRow>> {
        Ok(
            sqlx::query(&format!("SELECT {COLS} FROM preview_grants WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .map(row),
        )
    }

    /// A machine's grants (of one port, or all), oldest first.
    pub async fn preview_grants(
        &self,
        machine_id: &str,
        port: Option<u16>,
    ) -> Result<Vec<PreviewGrantRow>> {
        Ok(sqlx::query(&format!(
            "SELECT {COLS} FROM preview_grants WHERE machine_id = $1 AND ($2 < 0 OR port = $2)
             ORDER BY issued_at, id"
        ))
        .bind(machine_id)
        .bind(port.map_or(-1, i64::from))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(row)
        .collect())
    }

    /// Grants of a machine still usable at `now` (not revoked, not expired).
    pub async fn live_preview_grants(&self, machine_id: &str, now: i64) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) FROM preview_grants
             WHERE machine_id = $1 AND revoked_at = 0 AND expires_at > $2",
        )
        .bind(machine_id)
        .bind(now)
        .fetch_one(&self.pool)
        .await?
        .get(0))
    }

    /// Revokes a grant at `at`; false when it was already revoked or unknown.
    pub async fn revoke_preview_grant(&self, id: &str, at: i64) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE preview_grants SET revoked_at = $2 WHERE id = $1 AND revoked_at = 0",
        )
        .bind(id)
        .bind(at)
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0)
    }

    /// Forgets the grants of machines that ended (`machine_id`).
    pub async fn delete_preview_grants(&self, machine_id: &str) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM preview_grants WHERE machine_id = $1")
                .bind(machine_id)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
