from flexvlm_ray.cli import main

main()
