from unet_export.cli.main import main

main()
