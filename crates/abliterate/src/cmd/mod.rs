//! One module per subcommand: its clap `Args` and its `run`.

pub mod diff;
pub mod direction;
pub mod edit;
pub mod find;
pub mod generate;
pub mod inspect;
pub mod optimize;
pub mod run;
pub mod verify;
