from tl_ray.cli.app import console_main

console_main()
