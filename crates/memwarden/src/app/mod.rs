//! The application layer: one use case per operation, each a plain function that every way the
//! operation arrives calls (an HTTP handler, a peer's request on the socket, a background
//! operation), so a handler only parses, calls one use case and renders.
//!
//! Today: model loads ([`load`]), the hand-off of a held model to a worker ([`hand_off`]), the
//! model listing ([`models`]) and optimize on request ([`optimize`]). The other operations still
//! live in their handlers and move here one by one (issue 23).

pub mod hand_off;
pub mod load;
pub mod models;
pub mod optimize;
