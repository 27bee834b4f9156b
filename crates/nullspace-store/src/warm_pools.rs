//! Template warm pools (migrations/0007_warm_pools.sql): rows by namespace,
//! name unique within it. What a pool means (its document, its machines)
//! is the server's (`warm_pools/`).

use sqlx::Row;

use crate::{Result, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPoolRow {
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub template_id: String,
    /// `enabled`, `disabled` or `draining`.
    pub state: String,
    /// The server's JSON document of the pool.
    pub record: String,
    /// Epoch ms.
    pub created_at: i64,
    pub updated_at: i64,
}

const COLS: &str = "id, namespace, name, template_id, state, record, created_at, updated_at";

fn row(r: sqlx::any::AnyRow) -> WarmPoolRow {
    WarmPoolRow {
        id: r.get(0),
        namespace: r.get(1),
        name: r.get(2),
        template_id: r.get(3),
        state: r.get(4),
        record: r.get(5),
        created_at: r.get(6),
        updated_at: r.get(7),
    }
}

impl Store {
    /// Inserts a pool; false when its namespace has one of that name.
    pub async fn insert_warm_pool(&self, w: &WarmPoolRow) -> Result<bool> {
        let n = sqlx::query(&format!(
            "INSERT INTO warm_pools ({COLS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8
             WHERE NOT EXISTS (SELECT 1 FROM warm_pools WHERE namespace = $2 AND name = $3)"
        ))
        .bind(&w.id)
        .bind(&w.namespace)
        .bind(&w.name)
        .bind(&w.template_id)
        .bind(&w.state)
        .bind(&w.record)
        .bind(w.created_at)
        .bind(w.updated_at)
        .execute(&self.pool)
        .await;
        // Two creates of one name at once: the unique index decides.
        crate::wrote(n)
    }

    /// A namespace's pool by id (another namespace's is `None`).
    pub async fn warm_pool(&self, namespace: &str, id: &str) -> Result<Option<WarmPoolRow>> {
        Ok(sqlx::query(&format!(
            "SELECT {COLS} FROM warm_pools WHERE id = $1 AND namespace = $2"
        ))
        .bind(id)
        .bind(namespace)
        .fetch_optional(&self.pool)
        .await?
        .map(row))
    }

    /// A namespace's pools (every namespace's with `None`: a starting
    /// server restores them all), oldest first.
    pub async fn warm_pools(&self, namespace: Option<&str>) -> Result<Vec<WarmPoolRow>> {
        let q = match namespace {
            Some(_) => format!(
                "SELECT {COLS} FROM warm_pools WHERE namespace = $1 ORDER BY created_at, id"
            ),
            None => format!("SELECT {COLS} FROM warm_pools ORDER BY created_at, id"),
        };
        let mut q = sqlx::query(&q);
        if let Some(ns) = namespace {
            q = q.bind(ns);
        }
        Ok(q.fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(row)
            .collect())
    }

    /// Replaces a pool's name, template, state and document; false when it
    /// is gone, or the new name is another pool's.
    pub async fn update_warm_pool(&self, w: &WarmPoolRow) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE warm_pools SET name = $3, template_id = $4, state = $5, record = $6, updated_at = $7
             WHERE id = $1 AND namespace = $2
             AND NOT EXISTS (SELECT 1 FROM warm_pools WHERE namespace = $2 AND name = $3 AND id <> $1)",
        )
        .bind(&w.id)
        .bind(&w.namespace)
        .bind(&w.name)
        .bind(&w.template_id)
        .bind(&w.state)
        .bind(&w.record)
        .bind(w.updated_at)
        .execute(&self.pool)
        .await;
        crate::wrote(n)
    }

    /// Deletes a namespace's pool; whether it was there.
    pub async fn delete_warm_pool(&self, namespace: &str, id: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM warm_pools WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(namespace)
            .execute(&self.pool)
            .await?;
        Ok(n.rows_affected() > 0)
    }
}
