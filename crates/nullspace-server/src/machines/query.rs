//! Reading machines: one (`get`), and the caller's pages (`list`) with
//! the SDK's state, template and metadata filters.

use nullspace_model::machine::{MachineInfo, MachinePage, MachineStatus};
use nullspace_store::Caller;
use serde_json::{Map, Value};

use super::error::{MachineError, MachineResult};
use super::record::{self, Machine, plausible_id};
use crate::state::Shared;

/// `GET /v1/machines/{id}`: an ended machine is not found (the SDK's
/// `connect` must not hand out a handle to it); `list` still shows it.
pub async fn get(state: &Shared, c: &Caller, id: &str) -> MachineResult<MachineInfo> {
    Ok(record::load_live(state, c, id).await?.info())
}

/// Query of `GET /v1/machines`.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub limit: Option<i64>,
    pub next_token: Option<String>,
    pub states: Vec<String>,
    pub template: Option<String>,
    pub metadata: Option<Map<String, Value>>,
}

pub async fn list(state: &Shared, c: &Caller, q: ListQuery) -> MachineResult<MachinePage> {
    let limit = q.limit.unwrap_or(50).clamp(1, 100);
    let states: Vec<MachineStatus> = if q.states.is_empty() {
        MachineStatus::LIVE.to_vec()
    } else {
        q.states
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| MachineError::Invalid(format!("state: {e}")))
            })
            .collect::<MachineResult<_>>()?
    };
    let mut cursor = match &q.next_token {
        None => None,
        Some(t) => Some(
            t.split_once('_')
                .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, id.to_string())))
                .filter(|(_, id)| plausible_id(id))
                .ok_or_else(|| {
                    MachineError::Invalid("next_token is not one this server issued".into())
                })?,
        ),
    };
    let mut items = vec![];
    let mut has_next = false;
    'pages: loop {
        let rows = state
            .store
            .machines_page(&c.namespace, &states, limit + 1, cursor.clone())
            .await?;
        let n = rows.len();
        for row in rows {
            if items.len() == limit as usize {
                has_next = true;
                break 'pages;
            }
            cursor = Some((row.created_at, row.id.clone()));
            let m = Machine::from_row(row)?;
            if q.template.as_ref().is_some_and(|t| *t != m.doc.template) {
                continue;
            }
            if q.metadata
                .as_ref()
                .is_some_and(|f| f.iter().any(|(k, v)| m.doc.metadata.get(k) != Some(v)))
            {
                continue;
            }
            items.push(m.info());
        }
        if n < (limit + 1) as usize {
            break;
        }
    }
    let next_token = if has_next {
        items
            .last()
            .and(cursor.as_ref())
            .map(|(at, id)| format!("{at}_{id}"))
    } else {
        None
    };
    Ok(MachinePage {
        items,
        has_next,
        next_token,
    })
}
