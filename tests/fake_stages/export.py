from tests.fake_stages import fake_main

if __name__ == "__main__":
    raise SystemExit(fake_main("export"))
