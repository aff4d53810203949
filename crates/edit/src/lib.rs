//! Weight orthogonalization (method.md §6): remove a direction from everything that writes to the
//! residual stream, streaming a checkpoint into an edited copy.
//!
//! Depends on `checkpoint` only and never runs a forward pass.

pub mod direction;

pub use direction::{Direction, DirectionError};
