//! (being built)

pub fn run(_args: &[&str]) -> anyhow::Result<()> {
    anyhow::bail!("`fixtures` is not built yet")
}
