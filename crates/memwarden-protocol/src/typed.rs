//! Request data types tied to their action, so a caller sends a typed request and the action
//! cannot disagree with the data.

use crate::{Action, LoadModel, OffloadModel, OptimizeMemory, TrimCache, UnloadModel};
use serde::Serialize;

/// The data of one request action.
pub trait ActionData: Serialize {
    const ACTION: Action;
}

impl ActionData for LoadModel {
    const ACTION: Action = Action::LoadModel;
}

impl ActionData for UnloadModel {
    const ACTION: Action = Action::UnloadModel;
}

impl ActionData for OffloadModel {
    const ACTION: Action = Action::OffloadModel;
}

impl ActionData for TrimCache {
    const ACTION: Action = Action::TrimCache;
}

impl ActionData for OptimizeMemory {
    const ACTION: Action = Action::OptimizeMemory;
}
