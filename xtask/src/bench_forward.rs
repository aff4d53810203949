//! (being built)

pub fn run(_args: &[&str]) -> anyhow::Result<()> {
    anyhow::bail!("`bench_forward` is not built yet")
}
