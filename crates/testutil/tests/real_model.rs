//! The one place a real-model skip cannot hide: where `../shared` is present the real test model
//! must build (every real-model test then runs for real), and the tokenizer files committed under
//! `fixtures/smollm2/tokenizer/` (which the tokenizer and template tests use without the model)
//! must be the built model's own. Where `../shared` is absent, testutil's build script has already
//! printed a cargo warning that the real-model tests skip.

#[test]
fn the_real_model_builds_wherever_shared_is_present_and_its_tokenizer_is_the_committed_one() {
    let Some(shared) = testutil::shared() else {
        eprintln!("skipping: ../shared is absent (see the cargo warning of testutil's build script)");
        return;
    };
    let model = testutil::smollm2()
        .unwrap_or_else(|| panic!("`{}` is present but the real test model was not built", shared.display()));
    let committed = testutil::smollm2_tokenizer();
    for file in
        ["config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    {
        assert_eq!(
            std::fs::read(committed.join(file)).unwrap(),
            std::fs::read(model.join(file)).unwrap(),
            "fixtures/smollm2/tokenizer/{file} differs from the real model's"
        );
    }
}
